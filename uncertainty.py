"""Uncertainty of the worker's sub-calls, and the metrics that say whether it is good enough to
decide when the supervisor should step in (deferral, after Gatekeeper, arXiv 2502.19335).

What: per-sub-call confidence signals read off a rollout's per-token log-probs and entropies (no
extra forward pass), sample agreement (self-consistency), the calibration / separation metrics
(ECE, Brier, AUROC, deferral curve, s_d, s_o) and the Gatekeeper fine-tuning loss.
How: the math section below is torch/numpy only; the `--stage gatekeeper` / `--stage cascade` loops
are appended after it. Tests: `python -m pytest -q tests/test_uncertainty.py`.
What not: no calibration fitting (temperature scaling, isotonic), no learned router, no
multi-sample semantic clustering (self-consistency is exact match after normalisation). Metrics are
float64 numpy and meant for evaluation, not for backprop; only `gatekeeper_loss` is differentiable.

Legend: B batch, T tokens (of one sub-call answer, or padded), V vocabulary; `_T` etc. suffixes.

Conventions:
- Every `confidence()` value lies in [0, 1], higher = more confident, so each metric below accepts
  every signal. Only the log-prob ones are probabilities (exp of a mean / min / sum log-prob); the
  entropy ones are exp(-H), a monotone map chosen for range, so ECE/Brier on them mean little while
  AUROC and the deferral curve (which depend on order only) are unaffected.
- An empty answer (T = 0) carries no evidence: all its signals are nan and `confidence` maps nan
  to 0.0, the least confident value, so empty answers are deferred first.
"""
import math
from collections import Counter

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Math (torch/numpy only, no project imports). Training-stage code goes below the end marker.
# ----------------------------------------------------------------------------------------------

SIGNALS = ("mean_entropy", "first_entropy", "mean_logprob", "min_logprob", "seq_logprob",
           "mean_top2_margin", "self_consistency")


def signals(logprobs_T, entropies_T, top2_margin_T=None):
    """Confidence signals of one sub-call from its sampled tokens' log-probs and the entropies of
    the distributions they were drawn from. `top2_margin_T` (p_top1 - p_top2 per token) is
    optional. Returns a dict of floats, nan everywhere when T = 0 (see module docstring)."""
    logprobs_T = torch.as_tensor(logprobs_T, dtype=torch.float64).reshape(-1)
    entropies_T = torch.as_tensor(entropies_T, dtype=torch.float64).reshape(-1)
    assert logprobs_T.shape == entropies_T.shape, (logprobs_T.shape, entropies_T.shape)
    T = logprobs_T.numel()
    nan = float("nan")
    out = {"n_tokens": T}
    out["mean_entropy"] = entropies_T.mean().item() if T else nan
    out["first_entropy"] = entropies_T[0].item() if T else nan  # the first token's uncertainty
    out["mean_logprob"] = logprobs_T.mean().item() if T else nan
    out["min_logprob"] = logprobs_T.min().item() if T else nan
    out["seq_logprob"] = logprobs_T.sum().item() if T else nan  # length-biased: longer = lower
    if top2_margin_T is not None:
        top2_margin_T = torch.as_tensor(top2_margin_T, dtype=torch.float64).reshape(-1)
        out["mean_top2_margin"] = top2_margin_T.mean().item() if T else nan
    return out


def confidence(signal_name, sig_dict):
    """Map one signal to a confidence in [0, 1], higher = more confident; nan -> 0.0."""
    x = sig_dict[signal_name]
    if x is None or math.isnan(x):
        return 0.0
    if signal_name in ("mean_entropy", "first_entropy"):
        return math.exp(-x)  # H >= 0, so exp(-H) in (0, 1]
    if signal_name in ("mean_logprob", "min_logprob", "seq_logprob"):
        return math.exp(x)  # geometric-mean / worst-token / whole-sequence probability
    if signal_name in ("mean_top2_margin", "self_consistency"):
        return float(x)  # already a probability-scale number
    raise ValueError(f"unknown signal {signal_name!r}; known: {SIGNALS}")


def normalize_answer(s):
    """Collapse whitespace runs to one space, strip, lowercase."""
    return " ".join(s.split()).lower()


def self_consistency(samples):
    """Fraction of samples equal to the most common one after `normalize_answer`. Ties between
    modes do not matter (same count). No samples -> 0.0 (no evidence, least confident)."""
    if len(samples) == 0:
        return 0.0
    counts = Counter(normalize_answer(s) for s in samples)
    return max(counts.values()) / len(samples)


def _arrays(confidence, *labels):
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ys = [np.asarray(y, dtype=np.float64).reshape(-1) for y in labels]
    assert all(y.shape == c.shape for y in ys), (c.shape, [y.shape for y in ys])
    if np.isnan(c).any():
        raise ValueError("confidence contains nan; map missing values first (see confidence())")
    return (c, *ys)


def expected_calibration_error(confidence, correct, n_bins=10):
    """ECE with equal-width bins: bin k holds k/n_bins <= c < (k+1)/n_bins, c == 1.0 goes in the
    last bin; sum over bins of (bin count / n) * |accuracy - mean confidence|. nan when empty."""
    c, y = _arrays(confidence, correct)
    if c.size == 0:
        return float("nan")
    if c.min() < 0.0 or c.max() > 1.0:
        raise ValueError("ECE needs confidences in [0, 1]")
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins  # exact k/n, not linspace's k*step
    bin_N = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, n_bins - 1)
    count_K = np.bincount(bin_N, minlength=n_bins).astype(np.float64)
    conf_K = np.bincount(bin_N, weights=c, minlength=n_bins)
    acc_K = np.bincount(bin_N, weights=y, minlength=n_bins)
    return float(np.abs(acc_K - conf_K).sum() / c.size)  # = sum_k (n_k/n) |acc_k - conf_k|


def brier_score(confidence, correct):
    """Mean squared error between confidence and the 0/1 correctness. nan when empty."""
    c, y = _arrays(confidence, correct)
    return float(np.mean((c - y) ** 2)) if c.size else float("nan")


def auroc(confidence, correct):
    """P(conf of a random correct item > conf of a random incorrect one), ties count 1/2; this is
    the Mann-Whitney U / (n1 * n0), computed from average ranks. nan if either class is empty."""
    c, y = _arrays(confidence, correct)
    pos = y > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, counts = np.unique(c, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    avg_rank_U = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    u = avg_rank_U[inv][pos].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def _deferred_counts(n, ratios):
    """Number of items deferred at each ratio: round(r * n), numpy's round-half-to-even."""
    return np.rint(np.asarray(ratios, dtype=np.float64) * n).astype(np.int64)


def deferral_curve(confidence, correct_small, correct_large, ratios=None):
    """System accuracy when the lowest-confidence round(r*n) items go to the large model.
    Ties are broken by a stable sort: among equal confidences the earlier index is deferred
    first. Default grid: 101 ratios 0, 0.01, ..., 1. Returns (ratios_R, acc_R)."""
    c, s, l = _arrays(confidence, correct_small, correct_large)
    if c.size == 0:
        raise ValueError("deferral_curve needs at least one item")
    ratios = np.linspace(0.0, 1.0, 101) if ratios is None else np.asarray(ratios, np.float64)
    order = np.argsort(c, kind="stable")  # deferred first = lowest confidence
    cum_l = np.concatenate([[0.0], np.cumsum(l[order])])  # large-model correct among deferred
    cum_s = np.concatenate([[0.0], np.cumsum(s[order])])
    k_R = _deferred_counts(c.size, ratios)
    acc_R = (cum_l[k_R] + (cum_s[-1] - cum_s[k_R])) / c.size
    return ratios, acc_R


def deferral_performance(confidence, correct_small, correct_large, ratios=None):
    """Gatekeeper's s_d = int(acc_real - acc_rand) / int(acc_ideal - acc_rand) over r in [0, 1]
    (trapezoid on the deferral grid); 1 = ideal, 0 = random, < 0 = worse than random.

    - acc_ideal defers by gain (large correct - small correct) descending: first the small model's
      errors the large one fixes, then the neutral items, last the small model's correct answers
      the large one would break. This is the best accuracy reachable with each count, so s_d <= 1.
      Confidence = correct_small reaches s_d = 1 only when the ordering among the small model's
      errors does not matter (e.g. the large model is always right).
    - acc_rand is (1 - r) acc_S + r acc_L evaluated at the realised fraction k/n, k = round(r n):
      the expected accuracy of deferring k random items. This makes E[s_d] = 0 exactly for a
      random order and the denominator exactly 0 when no ordering helps (then s_d is nan).
    """
    c, s, l = _arrays(confidence, correct_small, correct_large)
    ratios, acc_real_R = deferral_curve(c, s, l, ratios)
    _, acc_ideal_R = deferral_curve(s - l, s, l, ratios)  # lowest (s - l) = biggest gain first
    n = c.size
    frac_R = _deferred_counts(n, ratios) / n
    acc_rand_R = (1.0 - frac_R) * s.mean() + frac_R * l.mean()
    num = np.trapezoid(acc_real_R - acc_rand_R, ratios)
    den = np.trapezoid(acc_ideal_R - acc_rand_R, ratios)
    if den <= 1e-12:  # mathematically den >= 0; only rounding noise can remain when it is 0
        return float("nan")
    return float(num / den)


def _scott_bandwidth(x):
    """Scott's rule in 1-D: sample std (ddof=1) * n^(-1/5); 0 when undefined or degenerate."""
    if x.size < 2:
        return 0.0
    return float(np.std(x, ddof=1) * x.size ** (-0.2))


def _kde(x_N, h, grid_G):
    z_GN = (grid_G[:, None] - x_N[None, :]) / h
    return np.exp(-0.5 * z_GN**2).sum(axis=1) / (x_N.size * h * math.sqrt(2.0 * math.pi))


def distribution_overlap(confidence, correct, bandwidth=None, grid=512):
    """Gatekeeper's s_o = int min(f_correct(c), f_incorrect(c)) dc, with Gaussian KDEs of the
    confidences of correct and incorrect items (0 = separable, 1 = identical). nan if a class is
    empty. bandwidth=None: Scott's rule per class; a class with < 2 items or no spread uses the
    pooled data's Scott bandwidth, and 1e-3 if that is 0 too. A number sets both bandwidths.
    The KDE is not reflected at 0 or 1. Trapezoid on `grid` points spanning the data +- 5
    bandwidths (the Gaussian tails beyond carry < 3e-7 of the mass)."""
    c, y = _arrays(confidence, correct)
    pos = y > 0.5
    x1, x0 = c[pos], c[~pos]
    if x1.size == 0 or x0.size == 0:
        return float("nan")
    if bandwidth is None:
        pooled = _scott_bandwidth(c) or 1e-3
        h1, h0 = _scott_bandwidth(x1) or pooled, _scott_bandwidth(x0) or pooled
    else:
        h1 = h0 = float(bandwidth)
    pad = 5.0 * max(h1, h0)
    grid_G = np.linspace(c.min() - pad, c.max() + pad, grid)
    return float(np.trapezoid(np.minimum(_kde(x1, h1, grid_G), _kde(x0, h0, grid_G)), grid_G))


def gatekeeper_loss(logits_BTV, labels_BT, alpha):
    """Gatekeeper loss for the small model: alpha * CE on the tokens it predicts right (argmax ==
    label) + (1 - alpha) * KL(p || uniform) on the tokens it predicts wrong, each summed and both
    divided by the number of labelled tokens (labels != -100). KL(p || U) = sum p log p + log V.
    High alpha keeps the model accurate; low alpha flattens its wrong predictions so confidence
    separates right from wrong. `labels_BT[b, t]` is the target of `logits_BTV[b, t]` (the caller
    shifts). Computed in at least float32 (bf16 -> fp32; fp64 stays fp64 for gradcheck). No
    labelled tokens -> 0 (still attached to the graph)."""
    dtype = torch.promote_types(logits_BTV.dtype, torch.float32)
    logp_BTV = torch.log_softmax(logits_BTV.to(dtype), dim=-1)
    V = logp_BTV.shape[-1]
    mask_BT = labels_BT != -100
    safe_labels_BT = labels_BT.masked_fill(~mask_BT, 0)
    ce_BT = -logp_BTV.gather(-1, safe_labels_BT.unsqueeze(-1)).squeeze(-1)
    kl_uniform_BT = (logp_BTV.exp() * logp_BTV).sum(-1) + math.log(V)
    right_BT = (logp_BTV.argmax(-1) == labels_BT) & mask_BT  # argmax is not differentiated
    wrong_BT = ~right_BT & mask_BT
    n = mask_BT.sum().clamp(min=1).to(dtype)
    loss_right = torch.where(right_BT, ce_BT, torch.zeros_like(ce_BT)).sum()
    loss_wrong = torch.where(wrong_BT, kl_uniform_BT, torch.zeros_like(kl_uniform_BT)).sum()
    return (alpha * loss_right + (1.0 - alpha) * loss_wrong) / n

# ----------------------------------------------------------------------------------------------
# End of math. Training stages (`--stage gatekeeper`, `--stage cascade`) go below.
# ----------------------------------------------------------------------------------------------

import hashlib
import os
import random
import types

import dist
import util

CASCADE_SIGNALS = ("mean_entropy", "first_entropy", "mean_logprob", "min_logprob")


def add_args(p):
    g = p.add_argument_group("gatekeeper and cascade (when should the cloud step in?)")
    g.add_argument("--gk-alphas", default="0.1,0.9", help="Gatekeeper alphas, one fine-tune each")
    g.add_argument("--gk-steps", type=int, default=None)
    g.add_argument("--gk-lr", type=float, default=None)
    g.add_argument("--gk-signal", default="mean_logprob", help="the confidence the deferral metrics use")
    g.add_argument("--tau", type=float, default=None, help="escalate sub-calls with confidence below tau "
                                                         "(default: sweep --cascade-rates)")
    g.add_argument("--cascade-rates", default="0.15,0.3,0.5", help="escalation rates swept per signal")
    g.add_argument("--cascade-signals", default=",".join(CASCADE_SIGNALS))
    g.add_argument("--abstain", type=int, default=1, help="1 = the cascade stage also runs rlm-edge+abstain rows: "
                   "the same thresholds turn unsure relays into `none` instead of escalating them (0 = off)")


def sub_confidence(call, signal):
    return confidence(signal, signals(call["logprobs"], call["entropies"]))


# ----------------------------------------------------------------------------------------------
# Gatekeeper: fine-tune the worker so its confidence separates its right and wrong relays

def relay_signals(model, tok, pairs, relay_tokens):
    """Greedy relays of `model` on (prompt, ideal) pairs -> (one signals() dict per relay, correct array)."""
    import lm
    ids = [tok.chat([{"role": "user", "content": p}]) for p, _ in pairs]
    sigs, correct = [], []
    for i in range(0, len(ids), 64):
        ro = lm.rollout(model, ids[i:i + 64], relay_tokens, temperature=0.0, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        for t, lp, ent, (_, gold) in zip(ro.tokens, ro.logprobs, ro.entropies, pairs[i:i + 64]):
            sigs.append(signals(lp, ent))
            correct.append(float(tok.decode(t).strip() == gold))
    return sigs, np.array(correct)


def relay_confidences(model, tok, pairs, signal, relay_tokens):
    """Greedy relays of `model` on (prompt, ideal) pairs -> (confidence, correct) arrays."""
    sigs, correct = relay_signals(model, tok, pairs, relay_tokens)
    return np.array([confidence(signal, d) for d in sigs]), correct


def deferral_table(sigs, correct_small, correct_large, signal_names, rate):
    """Per signal, and for random deferral: s_d, AUROC and the relay accuracy when the `rate`
    least confident relays go to the supervisor (random: its exact expectation), with the share of
    the worker -> supervisor accuracy gap that recovers. The relay-level view of the cascade: it
    ranks the signals even where end-to-end accuracy sits at the floor."""
    s, l = np.asarray(correct_small, np.float64), np.asarray(correct_large, np.float64)
    gap = l.mean() - s.mean()
    frac = _deferred_counts(s.size, [rate])[0] / s.size
    rows = {"random": {"s_d": 0.0, "auroc": 0.5, "accuracy": float((1 - frac) * s.mean() + frac * l.mean())}}
    for name in signal_names:
        conf = np.array([confidence(name, d) for d in sigs])
        acc = float(deferral_curve(conf, s, l, [rate])[1][0])
        rows[name] = {"s_d": float(deferral_performance(conf, s, l)), "auroc": float(auroc(conf, s)), "accuracy": acc}
    for r in rows.values():
        r["gap_recovered"] = float((r["accuracy"] - s.mean()) / gap) if abs(gap) > 1e-12 else float("nan")
    return {"rate": float(frac), "worker_acc": float(s.mean()), "supervisor_acc": float(l.mean()), "signals": rows}


def deferral_report(conf, correct_small, correct_large):
    return {"worker_acc": float(correct_small.mean()), "s_d": float(deferral_performance(conf, correct_small, correct_large)),
            "auroc": float(auroc(conf, correct_small)), "ece": float(expected_calibration_error(conf, correct_small)),
            "s_o": float(distribution_overlap(conf, correct_small))}


def train_gatekeeper(model, examples, alpha, steps, batch_size, lr, seed, grad_clip=1.0, micro_batch=0):
    import distill
    opt = distill.make_optimizer(model, lr, 0.0)
    dev = next(model.parameters()).device
    for step in range(steps):
        rng = random.Random(seed * 1_000_003 + step)
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        mine = dist.shard(batch)  # under torchrun: this rank's rows, weighted by its share of tokens
        model.train()
        for k in range(0, len(mine), micro_batch or len(mine) or 1):   # gradient accumulation
            part = mine[k:k + (micro_batch or len(mine))]
            ids_BT, attn_BT, tmask_BT = distill.pad_examples(part, 0)
            labels_BT = ids_BT.masked_fill(tmask_BT == 0, -100)
            logits_BTV = model(input_ids=ids_BT.to(dev), attention_mask=attn_BT.to(dev)).logits
            share = sum(len(c) for _, c in part) / sum(len(c) for _, c in batch)
            loss = gatekeeper_loss(logits_BTV[:, :-1], labels_BT[:, 1:].to(dev), alpha) * share
            loss.backward()
        for g in opt.param_groups:
            g["lr"] = util.cosine_lr(step, steps, lr, min(10, steps // 10 + 1))
        dist.sync_grads(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def stage_gatekeeper(args):
    import lm
    import rlm
    import tasks
    import train
    d = os.path.join(args.out, "gatekeeper")
    trajs = rlm.load_trajectories(os.path.join(args.out, "collect", "rlm-edge.jsonl"))
    prompts = sorted({c["prompt"] for t in trajs for c in t.calls if c["role"] == "sub"})
    heldout = train.heldout_relays(args)
    wdir = args.worker or os.path.join(args.out, "pretrain", "worker")
    base, tok = lm.load_model(wdir, args.device, args.dtype)
    sup, sup_tok = lm.load_model(args.supervisor or os.path.join(args.out, "pretrain", "supervisor"), args.device, args.dtype)
    _, large = relay_confidences(sup, sup_tok, heldout, args.gk_signal, args.relay_tokens)
    conf, small = relay_confidences(base, tok, heldout, args.gk_signal, args.relay_tokens)
    result = {"signal": args.gk_signal, "supervisor_acc": float(large.mean()), "before": deferral_report(conf, small, large),
              "after": {}}
    # the worker's own sub-call prompts, labelled with the gold relay of each chunk
    examples = train.encode_examples(tok, [(p, tasks.ideal_relay(p)) for p in prompts], base.config.max_position_embeddings)
    if args.fsdp and util.is_main():
        print("[gatekeeper] --fsdp covers pretrain, sft and opd; the Gatekeeper worker is replicated on every rank")
    for alpha in [float(a) for a in args.gk_alphas.split(",")]:
        model = lm.load_model(wdir, args.device, args.dtype, grad_ckpt=args.grad_ckpt)[0]
        train_gatekeeper(model, examples, alpha, args.gk_steps, args.sft_batch, args.gk_lr, args.seed, args.grad_clip,
                         args.micro_batch)
        lm.save_checkpoint(os.path.join(d, f"alpha{alpha:g}"), model, tok, {"alpha": alpha, "steps": args.gk_steps})
        conf, small = relay_confidences(model, tok, heldout, args.gk_signal, args.relay_tokens)
        result["after"][f"{alpha:g}"] = deferral_report(conf, small, large)
        print(f"[gatekeeper] alpha {alpha:g}: {result['after'][f'{alpha:g}']}")
    return result


# ----------------------------------------------------------------------------------------------
# Cascade inside the RLM: escalate unsure worker sub-calls to the supervisor

def cascade_hook(signal, tau, sup_ep, rate=None, seed=0, abstain=False):
    """A sub_hook for rlm.RLM: re-ask the supervisor where the worker's confidence < tau (or, for
    signal 'random', for a deterministic pseudo-random `rate` of the prompts). With abstain=True the
    unsure relays become `none` instead, at no cloud cost: the edge keeps quiet where it is unsure,
    which helps exactly when its wrong relays are invented facts (a root that aggregates ~140
    chunks is misled by one)."""
    import rlm

    def hook(prompts, outs, key, sched, traj):
        if signal == "random":
            esc = [int(hashlib.sha1(f"{seed}:{p}".encode()).hexdigest()[:8], 16) / 2**32 < rate for p in prompts]
        else:
            esc = [confidence(signal, signals(o["logprobs"], o["entropies"])) < tau for o in outs]
        idx = [i for i, e in enumerate(esc) if e]
        if not idx:
            return outs
        if abstain:
            quiet = {"text": "none", "n_in": 0, "n_out": 0, "tokens": [], "logprobs": [], "entropies": []}
            edge = types.SimpleNamespace(name="worker", cloud=False)
            for i in idx:
                traj.calls.append(rlm._call_record("abstention", edge, prompts[i], quiet, 1))
            return [quiet if e else o for o, e in zip(outs, esc)]
        ids = [sup_ep.tok.chat([{"role": "user", "content": prompts[i]}]) for i in idx]
        sup_outs = sched.call(key, sup_ep, ids)
        outs = list(outs)
        for i, o in zip(idx, sup_outs):
            traj.calls.append(rlm._call_record("escalation", sup_ep, prompts[i], o, 1))
            outs[i] = o
        return outs
    return hook


def stage_cascade(args):
    import report
    import rlm
    d = os.path.join(args.out, "cascade")
    eps = rlm.endpoints(args)      # memoised: the sweep replays the same greedy calls (rlm.Endpoint.memo)
    train_calls = [c for t in rlm.load_trajectories(os.path.join(args.out, "collect", "rlm-edge.jsonl"))
                   for c in t.calls if c["role"] == "sub"]
    groups = [g for g in rlm.eval_tasks(args) if g[0].meta["target_chars"] == args.long_chars]
    rates = [float(r) for r in args.cascade_rates.split(",")]
    sigs = [s.strip() for s in args.cascade_signals.split(",") if s.strip()]
    # relay level first (held-out chunks, no RLM): which signal separates the worker's right and
    # wrong relays, at the rate nearest 30%
    import train
    heldout = train.heldout_relays(args)
    w, s = eps["worker_sub"], eps["sup_sub"]
    sig_dicts, small = relay_signals(w.model, w.tok, heldout, args.relay_tokens)
    _, large = relay_signals(s.model, s.tok, heldout, args.relay_tokens)
    relay = deferral_table(sig_dicts, small, large, sigs, min(rates, key=lambda r: abs(r - 0.3)))
    for name, r in relay["signals"].items():
        print(f"[cascade] relay level, {name:>14}: s_d {r['s_d']:+.3f}  auroc {r['auroc']:.3f}  "
              f"acc@{relay['rate']:.0%} {r['accuracy']:.3f}  gap recovered {r['gap_recovered']:+.2f}")
    rows, curves, points = [], {}, []
    # cascades (unsure relays re-asked to the supervisor), then abstention (unsure relays become
    # `none`, no cloud call): the same signals, thresholds and rates
    for kind in ("cascade", "abstain") if args.abstain else ("cascade",):
        for sig in sigs + ["random"]:
            for rate in rates:
                if sig == "random":
                    tau = None
                elif args.tau is not None:
                    tau = args.tau
                else:   # the threshold that escalates `rate` of the training sub-calls
                    tau = float(np.quantile([sub_confidence(c, sig) for c in train_calls], rate))
                hook = cascade_hook(sig, tau, eps["sup_sub"], rate=rate, seed=args.seed, abstain=kind == "abstain")
                method = f"rlm-cascade({sig},{rate:g})" if kind == "cascade" else f"rlm-edge+abstain({sig},{rate:g})"
                role = "escalation" if kind == "cascade" else "abstention"
                for g in groups:
                    trajs = rlm.make_rlm(args, eps, sub_hook=hook).run_many(g, method, args.concurrency)
                    row = rlm.summarize(trajs, method)
                    esc = sum(c["role"] == role for t in trajs for c in t.calls)
                    row.update(signal=sig, target_rate=rate, tau=tau, kind=kind,
                               escalated=esc / max(1, sum(c["role"] == "sub" for t in trajs for c in t.calls)))
                    rows.append(row)
                mine = rows[-len(groups):]
                if kind == "cascade":
                    curves.setdefault(sig, []).append((sum(r["cost_usd"] for r in mine) / len(mine),
                                                       sum(r["accuracy"] for r in mine) / len(mine)))
                if args.tau is not None:
                    break
    # the two ends of every curve: rlm-edge and rlm-cloud at the same length
    ev = [r for r in (util.read_json(os.path.join(args.out, "eval", "result.json"))["rows"]) if r["context_chars"] == args.long_chars]
    for m in ("rlm-edge", "rlm-cloud"):
        mine = [r for r in ev if r["method"] == m]
        if mine:
            points.append((m, sum(r["cost_usd"] for r in mine) / len(mine), sum(r["accuracy"] for r in mine) / len(mine)))
    fig = report.plot_points(points, os.path.join(d, "cascade.png"), curves=[(k, sorted(v)) for k, v in curves.items()])
    best = _recovery([r for r in rows if r["kind"] == "cascade"], points, rates)
    return {"rows": rows, "figures": [os.path.relpath(fig, args.out)], "recovery": best, "relay_deferral": relay}


def _recovery(rows, points, rates):
    """Per signal: the fraction of the rlm-edge -> rlm-cloud accuracy gap recovered at ~30% escalation."""
    ends = {m: acc for m, _, acc in points}
    if "rlm-edge" not in ends or "rlm-cloud" not in ends or ends["rlm-cloud"] == ends["rlm-edge"]:
        return {}
    target = min(rates, key=lambda r: abs(r - 0.3))
    out = {}
    for sig in sorted({r["signal"] for r in rows}):
        mine = [r for r in rows if r["signal"] == sig and r["target_rate"] == target]
        if mine:
            acc = sum(r["accuracy"] for r in mine) / len(mine)
            out[sig] = {"rate": target, "escalated": sum(r["escalated"] for r in mine) / len(mine), "accuracy": acc,
                        "gap_recovered": (acc - ends["rlm-edge"]) / (ends["rlm-cloud"] - ends["rlm-edge"])}
    return out
