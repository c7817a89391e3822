"""The one entry point: every stage of the study, on the embedded tiny default or on real models.

    python train.py                                  # = --preset tiny --stage all
    python train.py --preset smoke                   # every stage in about two minutes (CI)
    python train.py --stage eval                     # one stage; its prerequisites must exist
    python train.py --worker Qwen/Qwen3-0.6B --supervisor Qwen/Qwen3-4B --device cuda --dtype bfloat16

Stages write into the run directory (`--out`, default `runs/<preset>`): `<stage>/result.json`
marks a stage as done, so a rerun skips it (unless `--force STAGE`), and an interrupted stage
resumes from its last checkpoint. `report.md` / `report.json` are rebuilt after every stage.

Pretraining (`--stage pretrain`) builds the two tiny models from scratch: a byte-level BPE trained
on the synthetic corpus, then the supervisor (cloud) and the worker (edge) trained on the task
formats: relaying what matters in a chunk, answering directly from a short context, and (the
supervisor only) writing the root program of a recursive language model, learnt from a
programmatic planner as the RLM authors trained RLM-Qwen3-8B on a larger model's trajectories.
The worker is several times smaller and trained for fewer steps, so it ends clearly weaker. Both
are pretrained with Muon (muon.py), which gets them through the retrieval plateau in about a
third of AdamW's steps.

What it deliberately does not do: no config files (every knob is a flag below), no logging
service (metrics are JSONL next to the checkpoints).
"""
import argparse
import dataclasses
import json
import os
import random
import sys
import time

import torch

import dist
import util
from util import UserError

# Presets: everything the tiny default needs that is not a model shape (shapes live in lm.py).
# A flag left at None takes the preset's value.
PRESETS = {
    "smoke": dict(vocab_size=384, bpe_chars=60_000, sup_steps=15, sup_tail_steps=2, worker_steps=10, batch_size=8,
                  lr=3e-3, short_chars=1_500, long_chars=6_000, eval_n=2, lines_per_chunk=8,
                  pretrain_examples=200, heldout_relays=24, collect_n=2, curve_n=1, shots=1, root_tokens=64, relay_tokens=16, collect_root="planner",
                  sft_steps=6, sft_batch=8, sft_lr=1e-3, opd_steps=4, opd_batch=4, opd_lr=1e-3, eval_every=2,
                  rl_steps=3, rl_batch=4, rl_lr=1e-3, gk_steps=4, gk_lr=1e-3),
    "tiny": dict(vocab_size=1024, bpe_chars=400_000, sup_steps=3000, sup_tail_steps=500, worker_steps=1000, batch_size=16,
                 lr=3e-3, short_chars=2_000, long_chars=20_000, eval_n=8, lines_per_chunk=8,
                 pretrain_examples=20_000, heldout_relays=200, collect_n=8, curve_n=2, shots=2, collect_root="model", root_tokens=256, relay_tokens=32,
                 sft_steps=120, sft_batch=16, sft_lr=5e-4, opd_steps=40, opd_batch=8, opd_lr=5e-4, eval_every=10,
                 rl_steps=30, rl_batch=8, rl_lr=3e-4, gk_steps=40, gk_lr=3e-4),
}
STAGES = ["pretrain", "eval", "collect", "fewshot", "sft", "rl", "opd", "gatekeeper", "cascade"]
REQUIRES = {"pretrain": [], "eval": ["pretrain"], "collect": ["pretrain"], "fewshot": ["collect"],
            "sft": ["collect"], "rl": ["collect"], "opd": ["collect", "sft"], "gatekeeper": ["collect"],
            "cascade": ["eval", "collect"]}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default="tiny", help="smoke | tiny (default tiny)")
    g.add_argument("--stage", default="all", help="all | " + " | ".join(STAGES))
    g.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    g.add_argument("--force", action="append", default=[], help="rerun this stage even if done (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing for every trained model (less memory, ~30%% more compute)")
    g.add_argument("--micro-batch", type=int, default=0,
                   help="rows per forward/backward in every training step (0 = the whole batch); gradients "
                        "accumulate and losses use the step's global token count, so the update is the same")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the trained model with FSDP2 "
                   "(pretrain, sft, opd) instead of replicating it (dist.py)")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    g.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="print two runs' main tables side by side")

    g = p.add_argument_group("models")
    g.add_argument("--worker", default=None, help="hub id or local dir of the worker (default: the tiny one pretrained here)")
    g.add_argument("--supervisor", default=None, help="hub id or local dir of the supervisor (default: tiny)")

    g = p.add_argument_group("pretrain (tiny models from scratch)")
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--bpe-chars", type=int, default=None, help="characters of corpus the BPE is trained on")
    g.add_argument("--sup-steps", type=int, default=None)
    g.add_argument("--worker-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--optimizer", default="muon", choices=["muon", "adamw"],
                   help="pretraining optimizer: muon (hidden matrices; AdamW at --lr for embeddings and norms, "
                        "muon.py) crosses the relay plateau in ~3x fewer steps than adamw")
    g.add_argument("--muon-lr", type=float, default=0.02, help="peak learning rate of Muon's matrices")
    g.add_argument("--amp", default="bfloat16", choices=["bfloat16", "off"],
                   help="pretraining matmuls in bfloat16 under autocast, float32 weights and optimizer (~1.4x "
                        "per step on a CPU with bf16 units); off = float32 throughout")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--pretrain-examples", type=int, default=None, help="training examples per model")
    g.add_argument("--heldout-relays", type=int, default=None, help="held-out chunks for relay accuracy")
    g.add_argument("--relay-questions", type=int, default=8, help="sub-questions per chunk in a pretraining example")
    g.add_argument("--relay-none-share", type=float, default=0.4,
                   help="share of pretraining sub-questions about another chunk (mostly `none`); real "
                        "sub-calls are ~90%% `none`, and a model that invents names there breaks counting")
    g.add_argument("--sup-tail-steps", type=int, default=None,
                   help="the supervisor's second phase: a warm restart (fresh warmup + cosine, new data) on a "
                        "mix with --tail-none-share; 0 = none. It stops the supervisor naming someone in chunks "
                        "that do not answer, which breaks counting (docs/LOG.md)")
    g.add_argument("--tail-none-share", type=float, default=0.9, help="--relay-none-share of the supervisor's tail")
    g.add_argument("--min-chunk-lines", type=int, default=4, help="shortest chunk in pretraining (longest: lines per chunk + 2)")
    g.add_argument("--ckpt-every", type=int, default=100)
    g.add_argument("--pretrain-from", default=None, metavar="RUN_DIR",
                   help="warm restart: continue RUN_DIR/pretrain's two models (and tokenizer) for --sup-steps / "
                        "--worker-steps more steps, with a fresh warmup + cosine and new data")

    g = p.add_argument_group("tasks and eval")
    g.add_argument("--short-chars", type=int, default=None, help="context that fits the supervisor's window")
    g.add_argument("--long-chars", type=int, default=None, help="context at least 10x longer")
    g.add_argument("--eval-n", type=int, default=None, help="held-out tasks per family and length")
    g.add_argument("--lines-per-chunk", type=int, default=None)
    g.add_argument("--families", default="needle,count,multihop,pairs")
    g = p.add_argument_group("fewshot and sft (settings 1 and 2)")
    g.add_argument("--shots", type=int, default=None, help="demonstrations per sub-call prompt (K)")
    g.add_argument("--sft-steps", type=int, default=None)
    g.add_argument("--sft-batch", type=int, default=None)
    g.add_argument("--sft-lr", type=float, default=None)
    import opd
    import rl_compress
    import rlm
    import uncertainty
    rlm.add_args(p)
    opd.add_args(p)
    rl_compress.add_args(p)
    uncertainty.add_args(p)
    return p


def resolve(args):
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset '{args.preset}'; choose one of {', '.join(PRESETS)} (e.g. --preset tiny)")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = os.path.join("runs", args.preset)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    import tasks
    for f in args.families:
        if f not in tasks.FAMILIES:
            raise UserError(f"unknown task family '{f}' in --families; choose from {', '.join(tasks.FAMILIES)}")
    for flag in ("worker", "supervisor"):
        name = getattr(args, flag)
        if name and not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
            raise UserError(f"--{flag} {name!r} is neither a local model directory nor a hub id like "
                            f"'Qwen/Qwen3-0.6B': fix the path or the name")
        if name and os.path.isdir(name) and not os.path.exists(os.path.join(name, "config.json")):
            raise UserError(f"--{flag} {name!r} has no config.json: pass a directory written by save_pretrained")
    return args


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping

def stage_dir(args, stage):
    return os.path.join(args.out, stage)


def stage_done(args, stage):
    return os.path.exists(os.path.join(stage_dir(args, stage), "result.json"))


def stale(args, stage):
    """A finished stage is redone when a stage it needs finished after it (e.g. after --force)."""
    mine = os.path.getmtime(os.path.join(stage_dir(args, stage), "result.json"))
    return any(os.path.getmtime(os.path.join(stage_dir(args, r), "result.json")) > mine for r in REQUIRES[stage])


def load_result(args, stage):
    with open(os.path.join(stage_dir(args, stage), "result.json")) as f:
        return json.load(f)


def run_stage(args, stage):
    for req in REQUIRES[stage]:
        if req == "pretrain" and args.worker and args.supervisor:
            continue                      # both models named: nothing to pretrain
        if not stage_done(args, req):
            raise UserError(f"stage '{stage}' needs stage '{req}' first: run `python train.py --preset {args.preset} "
                            f"--out {args.out} --stage {req}`")
    if stage_done(args, stage) and stage not in args.force and not stale(args, stage):
        print(f"[{stage}] done already ({stage_dir(args, stage)}/result.json); --force {stage} reruns it")
        return load_result(args, stage)
    os.makedirs(stage_dir(args, stage), exist_ok=True)
    t0 = time.time()
    result = STAGE_FNS[stage](args)
    result["seconds"] = round(time.time() - t0, 1)
    util.atomic_write_json(os.path.join(stage_dir(args, stage), "result.json"), result)
    import report
    report.write(args.out, {k: v for k, v in vars(args).items() if k != "compare"})
    return result


# ----------------------------------------------------------------------------------------------
# Pretraining data: the task formats, built from the generator's training split only.

def relay_examples(n, args, rng, split="train"):
    """(user prompt, ideal relay) pairs: a chunk of a training corpus and a sub-question about an
    entity in it (positive) or elsewhere in the corpus (usually answered `none`)."""
    import tasks
    out = []
    seed = rng.randrange(1 << 30)
    while len(out) < n:
        seed += 1
        t = tasks.generate_tasks(1, rng.choice(tasks.FAMILIES), 2_000, split=split, seed=seed)[0]
        lines = t.context.split("\n")
        for _ in range(16):
            k = rng.randint(max(2, args.lines_per_chunk // 2), args.lines_per_chunk + 2)
            i = rng.randrange(0, max(1, len(lines) - k))
            chunk = "\n".join(lines[i:i + k])
            src = lines[i:i + k] if rng.random() < 0.6 else lines
            subq = subquestion_for_line(rng.choice(src), rng)
            if subq is None:
                continue
            prompt = tasks.subcall_prompt(chunk, subq)
            out.append((prompt, tasks.ideal_relay(prompt)))
    return out[:n]


def relay_dialogues(n, args, rng, questions):
    """Pretraining's relay data: one chunk, then `questions` sub-questions about it as a multi-turn
    chat ("Question: ..." turns after the first). The first turn is exactly a sub-call; the later
    ones give the same forward pass up to `questions` retrieval targets instead of one, which is
    what lets a from-scratch model learn to read a chunk within a CPU budget (docs/LOG.md)."""
    import tasks
    out = []
    seed = rng.randrange(1 << 30)
    while len(out) < n:
        seed += 1
        t = tasks.generate_tasks(1, rng.choice(tasks.FAMILIES), 2_000, split="train", seed=seed)[0]
        lines = t.context.split("\n")
        for _ in range(8):
            k = rng.randint(args.min_chunk_lines, args.lines_per_chunk + 2)
            i = rng.randrange(0, max(1, len(lines) - k))
            chunk = "\n".join(lines[i:i + k])
            msgs = []
            for _ in range(questions):
                # about another chunk (usually answered `none`) with probability --relay-none-share
                src = lines[i:i + k] if rng.random() < 1 - args.relay_none_share else lines
                subq = subquestion_for_line(rng.choice(src), rng)
                if subq is None:
                    continue
                prompt = tasks.subcall_prompt(chunk, subq)
                msgs += [{"role": "user", "content": prompt if not msgs else f"Question: {subq}"},
                         {"role": "assistant", "content": tasks.ideal_relay(prompt)}]
            if msgs:
                out.append(msgs)
    return out[:n]


def subquestion_for_line(line, rng):
    """The sub-question this fact line answers (None for lines that answer none of them)."""
    import re
    for pat, fmt in ((r"^(.+) works at (.+) as .+\.$", None), (r"^(.+) lives in (.+)\.$", "Who lives in {1}?"),
                     (r"^(.+) was born in (\d+)\.$", "In what year was {0} born?"),
                     (r"^(.+) is based in (.+)\.$", "Where is {0} based?")):
        m = re.match(pat, line)
        if m:
            if fmt is None:
                fmt = rng.choice(["Who works at {1}?", "Where does {0} work?"])
            return fmt.format(*m.groups())
    return None


def direct_examples(n, args, rng, max_chars):
    """(context + question, answer) on contexts short enough to read whole."""
    import tasks
    out = []
    seed = rng.randrange(1 << 30)
    while len(out) < n:
        seed += 1
        fam = rng.choice(tasks.FAMILIES)
        t = tasks.generate_tasks(1, fam, rng.randint(max_chars // 3, max_chars), split="train", seed=seed)[0]
        out.append((direct_prompt(t.context, t.question), t.answer))
    return out


def direct_prompt(context, question):
    return f"{context}\nQuestion: {question}"


def encode_dialogues(tok, dialogues, max_len):
    """Multi-turn chats -> (everything before the last answer, last answer + EOS); trained with
    prompt_weight 1, so every earlier answer is a target too."""
    out = []
    for msgs in dialogues:
        p = tok.chat(msgs[:-1])
        c = tok.encode(msgs[-1]["content"]) + [tok.eos_id]
        if len(p) + len(c) <= max_len:
            out.append((p, c))
    return out


def encode_examples(tok, pairs, max_len):
    """Chat-format (user, assistant) pairs into (prompt_ids, completion_ids incl. EOS), dropping
    examples that do not fit the window."""
    out = []
    for user, answer in pairs:
        p = tok.chat([{"role": "user", "content": user}])
        c = tok.encode(answer) + [tok.eos_id]
        if len(p) + len(c) <= max_len:
            out.append((p, c))
    return out


def build_tokenizer(args, vocab_size, tok_dir):
    """BPE ranks trained on the training corpus plus the prompt and code formats (cached)."""
    import lm
    import rlm
    import tasks
    if os.path.exists(os.path.join(tok_dir, "tokenizer_tiktoken.json")):
        return lm.Tokenizer.load(tok_dir)
    texts, n = [], 0
    for i, fam in enumerate(tasks.FAMILIES * 1000):
        t = tasks.generate_tasks(1, fam, 4_000, split="train", seed=10_000 + i)[0]
        texts += [t.context, t.question, rlm.planner_program(t, args.lines_per_chunk),
                  "".join(f"\nQuestion: {q}" for q in t.subquestions)]  # the sub-call format too
        n += len(t.context)
        if n >= args.bpe_chars:
            break
    tok = lm.Tokenizer(enc=lm.train_bpe(texts, vocab_size))
    tok.save(tok_dir)
    return tok


def pretrain_data(args, tok, role, seed):
    """Both models learn to relay and to answer directly; the supervisor also learns the root role
    (question + metadata -> program) from the planner. Training split only."""
    import lm
    import rlm
    rng = random.Random(seed)
    win = lm.MODEL_PRESETS[args.preset][role].max_seq_len
    n = args.pretrain_examples
    data = (encode_dialogues(tok, relay_dialogues(n, args, rng, args.relay_questions), win)
            + encode_examples(tok, direct_examples(n // 20, args, rng, max_chars=3 * win), win))
    if role == "supervisor":
        data += encode_examples(tok, rlm.root_examples(n // 6, args, rng), win)
    return data


def pretrain_model(args, role, tok, out_dir, steps, seed, heldout, init=None, label=None):
    """Train one tiny model from scratch, or from the checkpoint `init` (resumable), save it, and
    measure held-out relay accuracy."""
    import distill
    import lm
    cfg = dataclasses.replace(lm.MODEL_PRESETS[args.preset][role], vocab_size=tok.vocab_size)
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        model, _ = lm.load_model(out_dir)
    else:
        data = pretrain_data(args, tok, role, seed)
        model = lm.load_model(init)[0] if init else lm.build_model(cfg, seed=seed)
        if args.fsdp:
            if args.optimizer == "muon":
                raise UserError("--fsdp shards the weight matrices that Muon orthogonalises whole; "
                                "pretrain with --optimizer adamw under --fsdp")
            dist.fsdp_wrap(model)
        state = out_dir.rstrip("/") + "_state.pt"
        probe = heldout[:48]
        distill.fit(model, data, steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                    weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=seed, state_path=state,
                    optimizer=args.optimizer, muon_lr=args.muon_lr,
                    amp=torch.bfloat16 if args.amp == "bfloat16" else None, micro_batch=args.micro_batch or None, prompt_weight=1.0, eval_every=max(1, steps // 4),
                    eval_fn=lambda m: {"relay_acc": relay_accuracy(m, tok, probe, args.relay_tokens)},
                    ckpt_every=args.ckpt_every, metrics=util.Metrics(out_dir.rstrip("/") + "_metrics.jsonl"),
                    name=f"pretrain {label or role}", quiet=args.quiet)
        lm.save_checkpoint(out_dir, model, tok, {"role": role, "steps": steps, "config": dataclasses.asdict(cfg)})
        util.remove(state)
        model, _ = lm.load_model(out_dir)  # plain weights (a sharded model is evaluated unsharded)
    preds = relay_preds(model, tok, heldout, args.relay_tokens)
    correct = [p == a for p, (_, a) in zip(preds, heldout)]
    acc, ffr = sum(correct) / max(1, len(correct)), false_fact_rate(preds, heldout)
    print(f"[pretrain] {label or role}: {lm.param_count(model) / 1e6:.2f}M params, held-out relay accuracy {acc:.3f}, "
          f"false facts on `none` chunks {ffr:.3f}")
    return {"params": lm.param_count(model), "steps": steps, "relay_accuracy": acc, "false_fact_rate": ffr,
            "correct": correct}


def heldout_relays(args):
    """Held-out (eval-split) chunks and sub-questions with their ideal relays."""
    return relay_examples(args.heldout_relays, args, random.Random(args.seed + 1), split="eval")


def stage_pretrain(args):
    import lm
    d = stage_dir(args, "pretrain")
    util.seed_everything(args.seed)
    src = os.path.join(args.pretrain_from, "pretrain") if args.pretrain_from else None
    if src and not os.path.exists(os.path.join(src, "worker", "meta.json")):
        raise UserError(f"--pretrain-from {args.pretrain_from}: no pretrained models there; run `python train.py "
                        f"--out {args.pretrain_from} --stage pretrain` first")
    tok = lm.Tokenizer.load(os.path.join(src, "tokenizer")) if src else \
        build_tokenizer(args, args.vocab_size, os.path.join(d, "tokenizer"))
    if src:
        tok.save(os.path.join(d, "tokenizer"))
    heldout = heldout_relays(args)
    result = {"tokenizer": {"vocab_size": tok.vocab_size}, "models": {}, "from": args.pretrain_from}
    # a warm restart draws new data (seed + 100): the same seed would replay the first run's batches
    shift = 100 if src else 0
    for role, steps, seed in (("supervisor", args.sup_steps, args.seed), ("worker", args.worker_steps, args.seed + 1)):
        init = os.path.join(src, role) if src else None
        tail = args.sup_tail_steps if role == "supervisor" else 0
        main_dir = os.path.join(d, role + ("_main" if tail else ""))
        result["models"][role] = pretrain_model(args, role, tok, main_dir, steps, seed + shift, heldout, init,
                                                label=f"{role} (main phase)" if tail else None)
        if tail:
            # exactly a warm restart of the main phase (`--pretrain-from`) on a `none`-heavy mix
            main = result["models"][role]
            targs = argparse.Namespace(**{**vars(args), "relay_none_share": args.tail_none_share})
            result["models"][role] = pretrain_model(targs, role, tok, os.path.join(d, role), tail,
                                                    seed + shift + 100, heldout, init=main_dir, label=f"{role} (tail)")
            result["models"][role]["steps"] += main["steps"]
            result["models"][role]["main_phase"] = {k: main[k] for k in ("steps", "relay_accuracy", "false_fact_rate")}
        if src:
            prev = util.read_json(os.path.join(src, "result.json"))["models"][role]["steps"]
            result["models"][role]["steps"] += prev
            if tail:
                result["models"][role]["main_phase"]["steps"] += prev
    # how much better the supervisor reads: the gap the teaching stages try to close
    result["gap"] = paired_gap(*(result["models"][r].pop("correct") for r in ("supervisor", "worker")))
    g = result["gap"]
    print(f"[pretrain] supervisor - worker: {g['mean']:+.3f} (95% CI {g['ci95'][0]:+.3f} .. {g['ci95'][1]:+.3f}, "
          f"{g['n']} held-out chunks)")
    return result


@torch.no_grad()
def relay_preds(model, tok, pairs, max_new_tokens=32, batch=64):
    """Greedy relays (stripped) for held-out (prompt, ideal relay) pairs."""
    import lm
    preds = []
    for i in range(0, len(pairs), batch):
        preds += lm.generate_text(model, tok, [u for u, _ in pairs[i:i + batch]], max_new_tokens, temperature=0.0)
    return [p.strip() for p in preds]


def relay_correct(model, tok, pairs, max_new_tokens=32, batch=64):
    """Per held-out chunk: does the greedy relay equal the ideal relay exactly?"""
    return [p == a for p, (_, a) in zip(relay_preds(model, tok, pairs, max_new_tokens, batch), pairs)]


def false_fact_rate(preds, pairs):
    """Share of the chunks whose ideal relay is `none` where the model relays something else. The
    balanced held-out set has a third of them; real sub-calls are ~90% `none`, so a root that counts
    or collects names over ~140 chunks is wrecked by a rate that barely moves relay accuracy."""
    claims = [p not in ("none", "") for p, (_, a) in zip(preds, pairs) if a == "none"]
    return sum(claims) / len(claims) if claims else float("nan")


def relay_accuracy(model, tok, pairs, max_new_tokens=32, batch=64):
    """Exact-match accuracy of greedy relays against the ideal relay on held-out chunks."""
    return sum(relay_correct(model, tok, pairs, max_new_tokens, batch)) / max(1, len(pairs))


def paired_gap(a, b):
    """Mean of a - b over the same examples (0/1 each) with a 95% normal interval of the paired
    differences: far tighter than two independent intervals, since both models see each chunk."""
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / max(1, n)
    sd = (sum((x - mean) ** 2 for x in d) / max(1, n - 1)) ** 0.5
    half = 1.96 * sd / max(1, n) ** 0.5
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def _lazy(module, fn):
    """Stage functions live in their concept's module; import it only when the stage runs."""
    return lambda args: getattr(__import__(module), fn)(args)


STAGE_FNS = {"pretrain": stage_pretrain, "eval": _lazy("rlm", "stage_eval"), "collect": _lazy("rlm", "stage_collect"),
             "fewshot": _lazy("distill", "stage_fewshot"), "sft": _lazy("distill", "stage_sft"),
             "rl": _lazy("rl_compress", "stage_rl"), "opd": _lazy("opd", "stage_opd"),
             "gatekeeper": _lazy("uncertainty", "stage_gatekeeper"), "cascade": _lazy("uncertainty", "stage_cascade")}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args = resolve(args)
        dist.init(args.device)           # under torchrun: join the process group (dist.py)
        args.device = dist.device(args.device)
        if not util.is_main():           # one rank talks and writes; the others only compute
            sys.stdout = open(os.devnull, "w")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.compare:
            import report
            print(report.compare(*args.compare))
            return 0
        stages = STAGES if args.stage == "all" else [args.stage]
        if args.stage == "all" and args.worker and args.supervisor:
            stages = stages[1:]           # both models named: nothing to pretrain
        for s in stages:
            if s not in STAGE_FNS:
                raise UserError(f"unknown stage '{s}'; choose one of all, {', '.join(STAGES)} (e.g. --stage eval)")
        for f in args.force:
            if f not in STAGE_FNS:
                raise UserError(f"unknown stage '{f}' in --force; choose one of {', '.join(STAGES)}")
        os.makedirs(args.out, exist_ok=True)
        util.atomic_write_json(os.path.join(args.out, "args.json"), vars(args))
        for s in stages:
            run_stage(args, s)
            dist.barrier()               # rank 0 has written this stage's result before anyone goes on
        import report
        table = report.write(args.out, {k: v for k, v in vars(args).items() if k != "compare"})
        if table:
            print(report.render_main(table))
            print(report.stage_times(args.out))
        print(f"report: {os.path.join(args.out, 'report.md')}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        dist.close()


if __name__ == "__main__":
    sys.exit(main())
