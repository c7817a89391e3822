"""On-policy distillation of the worker by the supervisor, gated by conditions.

    python train.py --stage opd                       # every variant below on the tiny default
    python train.py --stage opd --opd-loss jsd --beta 0.5 --lmbda 0.5 --gate entropy --lora-rank 8

The worker samples G relays for sub-call prompts of real RLM episodes (training split), a teacher
scores every sampled token, and the worker learns from its own samples (GKD; Thinking Machines'
on-policy distillation; Qwen3's strong-to-weak stage). Per step:

  1. B prompts from the pool (sub-calls of `rlm-edge`/`rlm-cloud` training episodes, collected
     once; `--opd-fact-share` draws that share from the prompts whose supervisor relay states a
     fact instead of `none`). A coin per prompt picks on-policy
     (prob. `--lmbda`: G student samples) or off-policy (the supervisor's relay: recorded in an
     `rlm-cloud` episode, else generated greedily once and cached).
  2. Gate (`--gate`): keep a sample only where the condition holds: `entropy` (mean token entropy
     of the sample above `--gate-threshold`), `first_token` (entropy of its first token above the
     threshold), `wrong` (its episode ended wrong), `disagree` (sampled reverse KL to the teacher
     above the threshold; the teacher must score it to know, and that cost is counted), `none`.
  3. Teacher (`--teacher`): `supervisor` (same tokenizer: scores the same ids; different
     tokenizer: re-tokenises the text, aligns by bytes, hybrid JSD/ULD loss), or `self`: the
     worker's own initial weights (frozen, or EMA with `--self-ema`) reading privileged context it
     does not see at test time: the chunk cut down to its gold evidence lines.
  4. Loss (`--opd-loss`): `sampled_rkl` (default): advantage A_t = -(log p_S(y_t) - log p_T(y_t))
     with the sampler's log-probs, discount 0, importance-sampling policy gradient; `jsd` (GKD,
     `--beta`) or `forward_kl` on the full vocabulary at the sampled positions.

Counted and logged: worker optimiser steps, teacher tokens scored, teacher+student FLOPs (2N per
forward token, 6N per trained token), held-out relay accuracy, held-out sampled reverse KL to the
supervisor, end-to-end `rlm-edge` accuracy on dev tasks.

Shapes: B prompts per step, G samples per prompt, S sequences kept, T completion tokens, V vocab.

What it deliberately does not do: no PPO clipping (one update per batch, so the ratio is 1), no
discounting of the per-token signal (Thinking Machines saw no gain), no replay buffer, no
refreshing of the pool with new episodes during training.
"""
import copy
import json
import os
import random

import torch
import torch.nn.functional as F

import dist
import util

def add_args(p):
    g = p.add_argument_group("opd (on-policy distillation)")
    g.add_argument("--opd-steps", type=int, default=None)
    g.add_argument("--opd-batch", type=int, default=None, help="prompts per step (B)")
    g.add_argument("--opd-samples", type=int, default=4, help="relays sampled per prompt (G)")
    g.add_argument("--opd-lr", type=float, default=None)
    g.add_argument("--opd-loss", default="sampled_rkl", help="sampled_rkl | jsd | forward_kl")
    g.add_argument("--beta", type=float, default=0.5, help="JSD beta (0 = forward KL, 1 = reverse KL)")
    g.add_argument("--lmbda", type=float, default=1.0, help="fraction of on-policy prompts (1 = fully on-policy)")
    g.add_argument("--teacher", default="supervisor", help="supervisor | self")
    g.add_argument("--self-ema", type=float, default=0.0, help="EMA rate of the self teacher (0 = frozen)")
    g.add_argument("--gate", default="none", help="none | entropy | first_token | wrong | disagree")
    g.add_argument("--gate-threshold", type=float, default=None, help="default: the median signal of the first step's samples")
    g.add_argument("--opd-fact-share", type=float, default=0.0,
                   help="share of each batch drawn from prompts whose supervisor relay states a fact (0 = the "
                        "episodes' own mix, ~10%% facts)")
    g.add_argument("--opd-variants", default=None, help="comma list: opd,sft+opd,opd-self,opd-gated,opd-xtok")
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-lr-mult", type=float, default=10.0, help="LoRA LR = this x the full-FT LR")
    g.add_argument("--eval-every", type=int, default=None, help="learning-curve points every N steps")


# ----------------------------------------------------------------------------------------------
# Pool of sub-call prompts

def prompt_pool(trajs):
    """Sub-calls of training episodes: the prompt, the supervisor's relay when the supervisor made
    it (rlm-cloud), and whether the episode ended right (for the `wrong` gate)."""
    pool = []
    for t in trajs:
        for c in t.calls:
            if c["role"] == "sub":
                pool.append({"prompt": c["prompt"], "relay": c["response"] if c["model"] == "supervisor" else None,
                             "correct": t.score >= 1.0, "family": t.family})
    return pool


def privileged_prompt(prompt):
    """The self-teacher's view: the chunk cut down to the lines that mention the question's
    entity (its gold evidence), or to one line when none does, so the format stays familiar."""
    import tasks
    chunk, _, q = prompt.rpartition("\nQuestion: ")
    lines = chunk.split("\n")
    ent = _question_entity(q)
    keep = [l for l in lines if ent and ent in l] or lines[:1]
    return tasks.subcall_prompt("\n".join(keep), q)


def _question_entity(q):
    import re
    for pat in (r"In what year was (.+) born\?", r"Who works at (.+)\?", r"Where does (.+) work\?",
                r"Where is (.+) based\?", r"Who lives in (.+)\?"):
        m = re.match(pat, q)
        if m:
            return m.group(1)
    return None


# ----------------------------------------------------------------------------------------------
# Padding helpers: lists of per-sequence tensors -> [S, T] with a mask

def pad_rows(rows, fill=0.0):
    T = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), T), fill, dtype=torch.float32)
    mask = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        r = torch.as_tensor(r, dtype=torch.float32)
        out[i, :len(r)] = r
        mask[i, :len(r)] = 1.0
    return out, mask


def pad_full(rows_TV):
    V = min(r.shape[-1] for r in rows_TV)
    T = max(r.shape[0] for r in rows_TV)
    out = rows_TV[0].new_zeros(len(rows_TV), T, V)
    for i, r in enumerate(rows_TV):
        out[i, :r.shape[0]] = r[:, :V]
    return out


def byte_offsets(tok, ids):
    """(start, end) byte offsets of each token of `ids` in tok.decode(ids), EOS zero-width at the end."""
    offs, prev = [], 0
    for k in range(1, len(ids) + 1):
        end = len(tok.decode(ids[:k]).encode("utf-8"))
        offs.append((prev, end))
        prev = end
    return offs


def matched_vocab(stok, ttok):
    s_strs, t_strs = stok.token_strings(), ttok.token_strings()
    t_index = {s: i for i, s in enumerate(t_strs) if s is not None}
    pairs = [(i, t_index[s]) for i, s in enumerate(s_strs) if s is not None and s in t_index]
    return [a for a, _ in pairs], [b for _, b in pairs]


def flops_forward(model, tokens):
    import lm
    return 2 * lm.param_count(model) * tokens


# ----------------------------------------------------------------------------------------------
# The loop

class OPD:
    """One on-policy distillation run: student (trained), teacher (frozen), a prompt pool."""

    def __init__(self, args, student, stok, teacher, ttok, pool, *, teacher_kind="supervisor"):
        import lora
        self.args, self.student, self.stok, self.teacher, self.ttok = args, student, stok, teacher, ttok
        self.pool, self.teacher_kind = pool, teacher_kind
        self.same_tok = teacher_kind == "self" or stok.vocab_size == ttok.vocab_size and stok.token_strings() == ttok.token_strings()
        if not self.same_tok:
            self.match_s, self.match_t = matched_vocab(stok, ttok)
        lr = args.opd_lr
        if args.lora_rank > 0:
            lora.apply(student, args.lora_rank, args.lora_alpha)
            lr *= args.lora_lr_mult
        import distill
        self.opt = distill.make_optimizer(student, lr, 0.0)
        self.lr = lr
        self.counters = {"step": 0, "teacher_tokens": 0, "student_tokens": 0, "flops": 0.0, "kept": 0, "sampled": 0}
        self.threshold = args.gate_threshold
        self.facts = None     # pool prompts whose supervisor relay states a fact (draw, --opd-fact-share)

    def draw(self, rng):
        """One step's prompts: uniform over the pool, or with `--opd-fact-share` of them (in
        expectation) drawn from the prompts whose supervisor relay states a fact (~10% of episode
        sub-calls; the rest are `none`, a prior that otherwise swamps the copying to be learnt)."""
        share = getattr(self.args, "opd_fact_share", 0.0)
        if share <= 0:        # the pool as the episodes made it (the RNG stream of earlier runs)
            return [self.pool[rng.randrange(len(self.pool))] for _ in range(self.args.opd_batch)]
        if self.facts is None:
            self.facts = [it for it in self.pool if (it["relay"] or "none").strip() != "none"]
            if not self.facts:
                raise util.UserError("--opd-fact-share: no pool prompt has a supervisor relay that states a fact "
                                     "(collect stage, rlm-cloud episodes); use --opd-fact-share 0")
        out = []
        for _ in range(self.args.opd_batch):
            src = self.facts if rng.random() < share else self.pool
            out.append(src[rng.randrange(len(src))])
        return out

    def fill_relays(self, items):
        """The supervisor's greedy relay for pool items that have none, cached in the item."""
        import lm
        if not items or self.teacher_kind != "supervisor":
            return
        ids = [self.ttok.chat([{"role": "user", "content": it["prompt"]}]) for it in items]
        with torch.no_grad():
            ro = lm.rollout(self.teacher, ids, self.args.relay_tokens, temperature=0.0,
                            eos_token_id=self.ttok.eos_id, pad_token_id=self.ttok.pad_id)
        for it, p, toks in zip(items, ids, ro.tokens):
            it["relay"] = self.ttok.decode([t for t in toks if t != self.ttok.eos_id])
            self.counters["teacher_tokens"] += len(p) + len(toks)

    # -- teacher scoring -------------------------------------------------------------------------
    def teacher_inputs(self, item, comp_ids):
        """Teacher prompt ids and completion ids for one student sequence."""
        if self.teacher_kind == "self":
            return self.stok.chat([{"role": "user", "content": privileged_prompt(item["prompt"])}]), comp_ids
        p = self.ttok.chat([{"role": "user", "content": item["prompt"]}])
        if self.same_tok:
            return p, comp_ids
        ends = len(comp_ids) > 0 and comp_ids[-1] == self.stok.eos_id
        text = self.stok.decode(comp_ids)
        return p, self.ttok.encode(text) + ([self.ttok.eos_id] if ends else [])

    def step(self, step):
        """One update; the counters are summed over ranks (each rank counts its own share)."""
        before = dict(self.counters)
        out = self._step(step)
        keys = [k for k in self.counters if k != "step"]
        deltas = dist.all_sum(*[float(self.counters[k] - before[k]) for k in keys])
        for k, d in zip(keys, deltas if len(keys) > 1 else [deltas]):
            self.counters[k] = before[k] + (int(d) if isinstance(before[k], int) else d)
        out["kept"] = self.counters["kept"] - before["kept"]
        return out

    def _step(self, step):
        import distill
        import lm
        a, rng = self.args, random.Random(self.args.seed * 1_000_003 + step)
        items = self.draw(rng)
        s_prompts = [self.stok.chat([{"role": "user", "content": it["prompt"]}]) for it in items]
        on = [rng.random() < a.lmbda for it in items]
        mine = dist.shard(list(range(len(items))))  # every rank drew the same batch; this is its share
        # an off-policy prompt needs a supervisor relay: recorded in rlm-cloud, else written now
        # (greedy, as in the RLM); a self-taught student without one samples instead
        self.fill_relays([items[i] for i in mine if not on[i] and items[i]["relay"] is None])
        on = [o or it["relay"] is None for o, it in zip(on, items)]

        # 1. sequences: G samples of each on-policy prompt, the supervisor's relay for the others
        seqs = []
        on_idx = [i for i in mine if on[i]]
        with dist.gathered(self.student):   # collective when sharded: every rank enters
            ro = lm.rollout(self.student, [s_prompts[i] for i in on_idx], a.relay_tokens, temperature=1.0,
                            eos_token_id=self.stok.eos_id, pad_token_id=self.stok.pad_id,
                            num_samples=a.opd_samples, seed=(a.seed * 7919 + step) * dist.world() + dist.rank()) if on_idx else None
        if on_idx:
            for k, toks in enumerate(ro.tokens):
                i = on_idx[k // a.opd_samples]
                seqs.append({"i": i, "comp": list(toks), "lp": list(ro.logprobs[k]), "ent": list(ro.entropies[k])})
            self.counters["flops"] += flops_forward(self.student, sum(len(s_prompts[i]) for i in on_idx)
                                                    + sum(len(t) for t in ro.tokens))
        for i in mine:
            if not on[i]:
                seqs.append({"i": i, "comp": self.stok.encode(items[i]["relay"]) + [self.stok.eos_id], "lp": None, "ent": None})
        seqs = [s for s in seqs if s["comp"]]
        self.counters["sampled"] += len(seqs)

        # 2. gate on the student's own signals (no teacher cost for what is gated out)
        if a.gate in ("entropy", "first_token"):
            self.set_default_threshold([self.gate_signal(s) for s in seqs if s["ent"] is not None])
        if a.gate in ("entropy", "first_token", "wrong"):
            seqs = [s for s in seqs if self.gate_keep(s, items[s["i"]])]

        # 3. teacher scoring (a rank whose share is empty still joins the collectives below)
        t_in = [self.teacher_inputs(items[s["i"]], s["comp"]) for s in seqs]
        full = a.opd_loss != "sampled_rkl" or not self.same_tok
        with torch.no_grad():
            t_out = lm.token_logprobs(self.teacher, [p for p, _ in t_in], [c for _, c in t_in], return_full=full) if t_in else []
        n_teacher = sum(len(p) + len(c) for p, c in t_in)
        self.counters["teacher_tokens"] += n_teacher
        self.counters["flops"] += flops_forward(self.teacher, n_teacher)
        if full:
            t_lp = [r.gather(1, torch.tensor(c).view(-1, 1)).squeeze(1) if len(c) else r[:0, 0]
                    for r, (_, c) in zip(t_out, t_in)]
        else:
            t_lp = t_out
        if a.gate == "disagree":
            rkl = [float(torch.tensor(s["lp"]).mean() - tl.mean()) if s["lp"] is not None and self.same_tok else None
                   for s, tl in zip(seqs, t_lp)]
            self.set_default_threshold([r for r in rkl if r is not None])
            keep = [r is None or r > self.threshold for r in rkl]
            seqs = [s for s, k in zip(seqs, keep) if k]
            t_in = [x for x, k in zip(t_in, keep) if k]
            t_out = [x for x, k in zip(t_out, keep) if k]
            t_lp = [x for x, k in zip(t_lp, keep) if k]
        self.counters["kept"] += len(seqs)
        comps = [s["comp"] for s in seqs]
        # losses are normalised by the global token (or sequence) count, so summed rank gradients
        # are the whole batch's gradient
        n_tok, n_seq = dist.all_sum(float(sum(len(c) for c in comps)), float(sum(1 for _, tc in t_in if tc)))
        if n_tok == 0:
            self.counters["step"] += 1
            return {"loss": 0.0, "kept": 0}
        if not seqs:  # nothing here this step, but the other ranks' gradients still arrive
            self.student.zero_grad(set_to_none=True)
            for _ in range(dist.n_micro(0, self.student)):   # a sharded student joins their passes
                dist.zero_pass(self.student)
            return self._update(step, torch.zeros(()), 0, [], 0)

        # 4. student forward with grad and the loss, `--micro-batch` sequences at a time: every
        # loss is a sum over sequences divided by the global token / sequence count, so the
        # accumulated gradient is the same whatever the micro-batch
        self.student.train()
        s_prompt_ids = [s_prompts[s["i"]] for s in seqs]
        mb = a.micro_batch or len(seqs)
        loss = torch.zeros(())
        for k in range(0, dist.n_micro(-(-len(seqs) // mb), self.student) * mb, mb):
            if k >= len(seqs):          # a sharded student: this rank pads to the others' count
                dist.zero_pass(self.student)
                continue
            part = slice(k, k + mb)
            mb_loss = self._loss(seqs[part], s_prompt_ids[part], comps[part], t_in[part], t_out[part], t_lp[part],
                                 full, n_tok, n_seq)
            mb_loss.backward()
            loss = loss + mb_loss.detach()
        return self._update(step, loss, len(seqs), s_prompt_ids, sum(len(c) for c in comps))

    def _loss(self, seqs, s_prompt_ids, comps, t_in, t_out, t_lp, full, n_tok, n_seq):
        """The distillation loss of some of this step's sequences, normalised by the step's global
        token count (n_seq for the cross-tokenizer loss)."""
        import distill
        import lm
        a = self.args
        s_out = lm.token_logprobs(self.student, s_prompt_ids, comps, return_full=full)
        if not self.same_tok:
            losses = []
            for s_full, t_full, s, (_, tc) in zip(s_out, t_out, seqs, t_in):
                if not tc:
                    continue
                losses.append(distill.cross_tokenizer_loss(
                    s_full, t_full, torch.tensor(s["comp"]), torch.tensor(tc), byte_offsets(self.stok, s["comp"]),
                    byte_offsets(self.ttok, tc), self.match_s, self.match_t, beta=a.beta))
            return torch.stack(losses).sum() / max(n_seq, 1.0) if losses else s_out[0].sum() * 0.0
        if a.opd_loss == "sampled_rkl":
            new_lp = torch.nn.utils.rnn.pad_sequence(s_out, batch_first=True)       # [S, T] with grad
            _, mask = pad_rows([torch.zeros(len(c)) for c in comps])
            samp = [torch.tensor(s["lp"]) if s["lp"] is not None else o.detach() for s, o in zip(seqs, s_out)]
            samp_lp, _ = pad_rows(samp)
            teach_lp, _ = pad_rows(t_lp)
            adv = -distill.sampled_reverse_kl(samp_lp, teach_lp, mask)
            return distill.importance_sampling_loss(new_lp, samp_lp, adv, mask, num_tokens=n_tok)
        s_full, t_full = pad_full(s_out), pad_full(t_out)
        V = min(s_full.shape[-1], t_full.shape[-1])
        _, mask = pad_rows([torch.zeros(len(c)) for c in comps])
        if a.opd_loss == "jsd":
            return distill.generalized_jsd(s_full[..., :V], t_full[..., :V], mask, beta=a.beta, num_tokens=n_tok)
        if a.opd_loss == "forward_kl":
            return distill.forward_kl(s_full[..., :V], t_full[..., :V], mask, num_tokens=n_tok)
        raise util.UserError(f"unknown --opd-loss '{a.opd_loss}'; choose sampled_rkl, jsd or forward_kl")

    def _update(self, step, loss, kept, s_prompt_ids, n_tok):
        """Sum gradients across ranks, clip, step; count this rank's student tokens and FLOPs."""
        a = self.args
        for g in self.opt.param_groups:
            g["lr"] = util.cosine_lr(step, a.opd_steps, self.lr, min(10, a.opd_steps // 10 + 1))
        params = [p for p in self.student.parameters() if p.requires_grad]
        dist.sync_grads(params)
        torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.student.eval()
        self.counters["student_tokens"] += n_tok
        self.counters["flops"] += 3 * flops_forward(self.student, sum(len(p) for p in s_prompt_ids) + n_tok)
        self.counters["step"] += 1
        if self.teacher_kind == "self" and a.self_ema > 0:
            with torch.no_grad():
                for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
                    pt.lerp_(ps.detach(), a.self_ema)
        return {"loss": dist.all_sum(float(loss.detach())), "kept": kept}

    def set_default_threshold(self, values):
        """Without --gate-threshold, the first step's median signal becomes the threshold, so the
        gate keeps about half the samples whatever the signal's scale. (A fixed 0.05 nats kept
        every sample of a high-entropy tiny worker: gated OPD was plain OPD.)"""
        if self.threshold is None and values:
            self.threshold = float(torch.tensor(values).median())

    def gate_signal(self, s):
        import uncertainty
        sig = uncertainty.signals(torch.tensor(s["lp"]), torch.tensor(s["ent"]))
        return sig["mean_entropy"] if self.args.gate == "entropy" else sig["first_entropy"]

    def gate_keep(self, s, item):
        if self.args.gate == "wrong":
            return not item["correct"]
        if s["ent"] is None:                     # off-policy supervisor relays always teach
            return True
        return self.gate_signal(s) > self.threshold


# ----------------------------------------------------------------------------------------------
# Curves: what is logged at each evaluation point

@torch.no_grad()
def heldout_reverse_kl(student, stok, teacher, ttok, prompts, relay_tokens, seed=0):
    """Mean over sampled tokens of log p_S(y) - log p_T(y) on held-out prompts (same tokenizer)."""
    import lm
    ids = [stok.chat([{"role": "user", "content": p}]) for p in prompts]
    ro = lm.rollout(student, ids, relay_tokens, temperature=1.0, eos_token_id=stok.eos_id, pad_token_id=stok.pad_id, seed=seed)
    tids = [ttok.chat([{"role": "user", "content": p}]) for p in prompts]
    keep = [i for i, t in enumerate(ro.tokens) if len(t)]
    t_lp = lm.token_logprobs(teacher, [tids[i] for i in keep], [list(ro.tokens[i]) for i in keep])
    diffs = torch.cat([torch.tensor(ro.logprobs[i]) - t for i, t in zip(keep, t_lp)])
    return float(diffs.mean()) if diffs.numel() else 0.0


def curve_point(args, student, stok, teacher, ttok, heldout, dev_groups, counters=None):
    import rlm
    import train
    row = {"relay_acc": train.relay_accuracy(student, stok, heldout, args.relay_tokens)}
    if stok.token_strings() == ttok.token_strings():
        row["heldout_rkl"] = heldout_reverse_kl(student, stok, teacher, ttok, [p for p, _ in heldout[:64]], args.relay_tokens)
    if dev_groups:
        row["e2e_acc"] = rlm.worker_accuracy(args, student, stok, dev_groups)
    if counters:
        row.update({k: counters[k] for k in ("teacher_tokens", "flops", "student_tokens")})
    return row


def train_worker(args, name, init_dir, teacher_kind, pool, heldout, dev_groups, out_dir, overrides=None):
    """Run one OPD variant from `init_dir`; write metrics, the merged checkpoint, and return counters."""
    import lm
    import lora
    a = copy.copy(args)
    for k, v in (overrides or {}).items():
        setattr(a, k, v)
    student, stok = lm.load_model(init_dir, a.device, a.dtype, grad_ckpt=a.grad_ckpt)
    if teacher_kind == "self":
        teacher, ttok = copy.deepcopy(student), stok
    else:
        teacher, ttok = lm.load_model(a.supervisor or os.path.join(a.out, "pretrain", "supervisor"), a.device, a.dtype)
    teacher.eval().requires_grad_(False)
    # the curves always measure against the supervisor (a self-taught student too)
    if teacher_kind == "supervisor":
        sup, sup_tok = teacher, ttok
    else:
        sup, sup_tok = lm.load_model(a.supervisor or os.path.join(a.out, "pretrain", "supervisor"), a.device, a.dtype)
    metrics = util.Metrics(os.path.join(out_dir, "metrics.jsonl"))
    util.remove(metrics.path)            # a variant reruns from scratch; it is minutes on CPU
    if a.fsdp:
        if a.lora_rank > 0 or (teacher_kind == "self" and a.self_ema > 0):
            raise util.UserError("--fsdp shards full fine-tuning only: drop --lora-rank / --self-ema, or drop --fsdp")
        dist.fsdp_wrap(student)
    run = OPD(a, student, stok, teacher, ttok, pool, teacher_kind=teacher_kind)
    with dist.gathered(student):
        metrics.log(step=0, **curve_point(a, student, stok, sup, sup_tok, heldout, dev_groups, run.counters))
    prog = util.Progress(name, a.opd_steps, quiet=a.quiet)
    for step in range(a.opd_steps):
        out = run.step(step)
        metrics.log(step=step + 1, loss=out["loss"], kept=out["kept"], teacher_tokens=run.counters["teacher_tokens"],
                    flops=run.counters["flops"])
        if (step + 1) % a.eval_every == 0 or step + 1 == a.opd_steps:
            with dist.gathered(student):
                metrics.log(step=step + 1, **curve_point(a, student, stok, sup, sup_tok, heldout, dev_groups, run.counters))
        prog.update(step + 1, loss=out["loss"])
    prog.close()
    if a.lora_rank > 0:
        lora.merge(student)
    lm.save_checkpoint(os.path.join(out_dir, "worker"), student, stok, {"variant": name, **run.counters})
    return run.counters


# ----------------------------------------------------------------------------------------------
# The stage: every variant, its rows, the curves and the efficiency ratio

VARIANTS = {
    # name: (init, teacher, overrides)
    "opd": ("pretrain", "supervisor", {}),
    "sft+opd": ("sft", "supervisor", {}),
    "opd-self": ("pretrain", "self", {}),
    "opd-gated": ("pretrain", "supervisor", {"gate": "entropy"}),
    "opd-xtok": ("xtok", "supervisor", {}),
}


def xtok_worker(args):
    """A worker with its own tokenizer (a different BPE vocabulary from the supervisor's),
    pretrained with the same recipe: the cross-tokenizer distillation student."""
    import train
    d = os.path.join(args.out, "opd", "xtok")
    tok = train.build_tokenizer(args, args.vocab_size * 3 // 4, os.path.join(d, "tokenizer"))
    info = train.pretrain_model(args, "worker", tok, os.path.join(d, "worker"), args.worker_steps, args.seed + 2,
                                train.heldout_relays(args))
    return os.path.join(d, "worker"), info


def steps_to_reach(rows, key, target):
    """First logged step whose `key` reaches `target` (None if never)."""
    for r in rows:
        if key in r and r[key] >= target - 1e-9:
            return r["step"]
    return None


def stage_opd(args):
    import lm
    import report
    import rlm
    import train
    d = os.path.join(args.out, "opd")
    pool = prompt_pool(rlm.load_trajectories(os.path.join(args.out, "collect", "rlm-cloud.jsonl"))
                       + rlm.load_trajectories(os.path.join(args.out, "collect", "rlm-edge.jsonl")))
    heldout, dev = train.heldout_relays(args), rlm.dev_tasks(args)
    names = [v.strip() for v in (args.opd_variants or ",".join(VARIANTS)).split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            raise util.UserError(f"unknown OPD variant '{v}'; choose from {', '.join(VARIANTS)}")
    gated_gate = args.gate if args.gate != "none" else "entropy"
    rows, curves, result = [], {}, {"variants": {}}
    for v in names:
        init, teacher, over = VARIANTS[v]
        over = dict(over, gate=gated_gate) if v == "opd-gated" else over
        vd = os.path.join(d, v)
        if init == "sft":
            init_dir = os.path.join(args.out, "sft", "sft", "worker")
            if not os.path.exists(init_dir):
                raise util.UserError(f"variant sft+opd needs the SFT worker: run `python train.py --preset {args.preset} --out {args.out} --stage sft`")
        elif init == "xtok":
            init_dir, result["xtok_pretrain"] = xtok_worker(args)
        else:
            init_dir = args.worker or os.path.join(args.out, "pretrain", "worker")
        if os.path.exists(os.path.join(vd, "worker", "meta.json")):
            with open(os.path.join(vd, "worker", "meta.json")) as f:
                counters = json.load(f)
        else:
            counters = train_worker(args, v, init_dir, teacher, pool, heldout, dev, vd, over)
        model, tok = lm.load_model(os.path.join(vd, "worker"), args.device, args.dtype)
        method = f"rlm-edge+{v}" + (f"({over['gate']})" if "gate" in over else "")
        rows += rlm.eval_worker(args, model, tok, method, extra={"teacher_tokens": counters.get("teacher_tokens", 0)})
        curves[v] = util.read_jsonl(os.path.join(vd, "metrics.jsonl"))
        result["variants"][v] = {k: counters.get(k) for k in ("teacher_tokens", "student_tokens", "flops", "kept", "sampled", "step")}

    # Compute efficiency against SFT: worker steps to reach SFT's final held-out relay accuracy.
    sft_path = os.path.join(args.out, "sft", "sft", "metrics.jsonl")
    series = [(v, curves[v]) for v in ("opd", "sft+opd") if v in curves]
    if os.path.exists(sft_path):
        sft_rows = util.read_jsonl(sft_path)
        series = [("sft", sft_rows)] + series
        evals = [r for r in sft_rows if "relay_acc" in r]
        if evals and "opd" in curves:
            target, sft_steps = evals[-1]["relay_acc"], evals[-1]["step"]
            reach = steps_to_reach(curves["opd"], "relay_acc", target)
            result["efficiency"] = {"sft_final_relay_acc": target, "sft_steps": sft_steps, "opd_steps_to_reach": reach,
                                    "ratio": (sft_steps / reach) if reach else None}
            if reach == 0:      # the ratio would divide by zero: say why instead of printing inf
                result["efficiency"]["note"] = ("undefined: the worker OPD starts from already reaches SFT's final "
                                                "accuracy (SFT did not improve on its start)")
            elif reach is None:
                result["efficiency"]["note"] = "undefined: OPD never reached SFT's final accuracy"
    rl_path = os.path.join(args.out, "rl", "rl-correct", "metrics.jsonl")
    if os.path.exists(rl_path):      # GRPO with a correctness reward: the RL baseline of the comparison
        series.append(("grpo-correct", util.read_jsonl(rl_path)))
    figs = [report.plot_curves(series, "step", ["relay_acc", "heldout_rkl", "e2e_acc"], os.path.join(d, "curves_steps.png"),
                               "worker optimiser steps"),
            report.plot_curves(series, "flops", ["relay_acc", "e2e_acc"], os.path.join(d, "curves_flops.png"),
                               "teacher + student FLOPs")]
    result["figures"] = [os.path.relpath(f, args.out) for f in figs]
    result["rows"] = rows
    return result
