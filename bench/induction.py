"""How many steps until the tiny worker shape learns to copy a repeated span, with AdamW and with
Muon? JSON line last.

    python bench/induction.py                           # variable offset, AdamW vs Muon, ~10 min on 1 thread
    python bench/induction.py --runs fixed-adamw,variable-adamw --steps 3000   # the positional shortcut

Relaying a fact from a chunk is retrieval: find the question's entity in the chunk and copy what
follows it. A transformer does that with an induction head (a previous-token head plus a head that
matches on content), and the tiny models of this project learn retrieval only after a long plateau
(1,250-2,000 pretraining steps; docs/LOG.md). This probe isolates copying on random tokens:
each row holds a random span of --span tokens that is repeated later in the row, and we measure
the NLL of the repeat. With a fixed offset between the two copies, one attention head with RoPE
can look a constant distance back (a positional shortcut, learnt in a few hundred steps); with a
variable offset only a real induction head copies. Each run is an offset kind and an optimizer
(AdamW on everything, or Muon on the hidden matrices with AdamW on embeddings and norms: muon.py,
what train.py pretrains with), same model shape (the tiny worker's), data and batch, side by side
in one process; `steps_to_copy` is the first evaluation with NLL below --threshold nats (null: not
within --steps). Loss on every token, as in pretraining.

Measured (2-core CPU, one thread, defaults): fixed offset starts to copy at step ~500 (NLL 1.13 at
step 1,000); variable offset stays at chance (6.93) through 3,000 steps, and through 600-1,000
steps in edited copies with an init std of 0.08, untied embeddings, a Llama block, lr 1e-2,
batch 64, loss on the repeat only, a 59-token alphabet, or offsets that grow from 0 (docs/LOG.md).
Real relay data transitions earlier (1,250-2,000 steps): its structure (entity names that recur,
questions that name them) is easier than random tokens, and adding 25% random copy rows to the
pretraining mix moved neither (no retrieval and no random copying by step 1,000).

Not covered: the pretraining mix itself (train.py's held-out relay accuracy measures that), other
model shapes than --layers / --d-model, and a recipe that shortens the plateau: this is a
yardstick to try such recipes against.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lm  # noqa: E402
import muon  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--runs", default="variable-adamw,variable-muon", help="comma list of {fixed,variable}-{adamw,muon}")
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--lr", type=float, default=3e-3, help="AdamW (and Muon's embeddings and norms)")
ap.add_argument("--muon-lr", type=float, default=0.02)
ap.add_argument("--span", type=int, default=12, help="tokens in the repeated span")
ap.add_argument("--max-gap", type=int, default=40, help="variable offset: span + 0..max-gap tokens")
ap.add_argument("--vocab", type=int, default=1024)
ap.add_argument("--d-model", type=int, default=128)
ap.add_argument("--layers", type=int, default=3)
ap.add_argument("--threshold", type=float, default=1.0, help="copy NLL (nats) that counts as copying")
ap.add_argument("--eval-every", type=int, default=100)
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
T = 20 + a.span + a.max_gap + a.span


def batch(n, gen, variable):
    """[n, T] random ids with span [s, s+K) repeated at [s+K+gap, ...); mask marks the predictable repeats."""
    ids_NT = torch.randint(5, a.vocab, (n, T), generator=gen)
    start = torch.randint(0, 20, (n,), generator=gen)
    gap = torch.randint(0, a.max_gap + 1, (n,), generator=gen) if variable else torch.full((n,), a.max_gap // 2)
    mask_NT = torch.zeros(n, T, dtype=torch.bool)
    for i in range(n):
        s, r = int(start[i]), int(start[i] + a.span + gap[i])
        ids_NT[i, r:r + a.span] = ids_NT[i, s:s + a.span]
        mask_NT[i, r + 1:r + a.span] = True   # the repeat's first token is not predictable
    return ids_NT, mask_NT


def copy_nll(model, ids_NT, mask_NT):
    logp = model(ids_NT).logits[:, :-1].log_softmax(-1).gather(-1, ids_NT[:, 1:, None])[..., 0]
    m = mask_NT[:, 1:]
    return float(-(logp * m).sum() / m.sum())


def run(variable, optimizer):
    cfg = lm.ModelConfig(arch="qwen3", vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=4,
                         n_kv_heads=2, d_ff=3 * a.d_model, max_seq_len=512)
    model = lm.build_model(cfg, seed=0)
    opt = muon.for_model(model, a.lr, a.muon_lr, 0.1) if optimizer == "muon" else \
        torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    test = batch(128, torch.Generator().manual_seed(1), variable)
    curve, reached, t0 = [], None, time.time()
    for step in range(a.steps + 1):
        if step % a.eval_every == 0:
            with torch.no_grad():
                nll = copy_nll(model, *test)
            curve.append(round(nll, 3))
            print(f"{'variable' if variable else 'fixed':>8} offset, {optimizer:5}  step {step:5d}  copy NLL {nll:.3f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if nll < a.threshold:
                reached = step
                break
        if step == a.steps:
            break
        ids_NT, _ = batch(a.batch, gen, variable)
        loss = F.cross_entropy(model(ids_NT).logits[:, :-1].flatten(0, 1), ids_NT[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"steps_to_copy": reached, "curve": curve, "seconds": round(time.time() - t0, 1)}


print(json.dumps(vars(a)))
res = {}
for r in a.runs.split(","):
    offset, optimizer = r.strip().split("-")
    res[r.strip()] = run(offset == "variable", optimizer)
out = {"bench": "induction", "chance_nll": round(float(torch.log(torch.tensor(a.vocab - 5.0))), 3),
       "steps": a.steps, "batch": a.batch}
for k, v in res.items():
    out.update({f"{k}_steps_to_copy": v["steps_to_copy"], f"{k}_final_nll": v["curve"][-1], f"{k}_seconds": v["seconds"]})
if {"variable-adamw", "variable-muon"} <= set(res):   # steps AdamW needed per step Muon needed (>1: Muon faster)
    sa, sm = res["variable-adamw"]["steps_to_copy"], res["variable-muon"]["steps_to_copy"]
    out["adamw_over_muon_steps"] = round(sa / sm, 2) if sa and sm else None
print(json.dumps(out))
