"""RL for the worker: GRPO with a compression reward (answer correctness, succinctness of the relay,
and the compressor-predictor mutual information of arXiv 2512.21720).

What: group advantages, one GRPO loss with its choices as arguments (ratio/clip, KL estimator,
normalisation), the k1/k2/k3 KL estimators, the label-free MI estimate from sequence log-probs,
and the reward pieces.
How: the math section below is torch only; the `--stage rl` loop is appended after it.
Tests: `python -m pytest -q tests/test_grpo.py`.
What not (departures from the papers, on purpose):
1. Advantage is r - mean over the group (Dr. GRPO); dividing by the group std is opt-in and uses
   the population std (divide by G), as nano-aha-moment and GRPO-Zero do, not torch.std's G - 1.
2. One loss for GRPO / DAPO / Dr. GRPO: they differ only in `norm` and the clip range.
3. No DAPO overlong shaping, no dynamic re-sampling: callers skip zero-variance groups and log
   their fraction (`group_advantages` flags them).
4. The KL term (off by default) goes into the loss, not the reward, as in GRPO.
5. No process supervision: one scalar advantage per sequence.

Legend: P prompts, G samples per prompt, B = P*G sequences, T tokens (padded), N contexts,
M samples per context.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------
# Math (torch only, no project imports). Training-stage code goes below the end marker.
# ----------------------------------------------------------------------------------------------


def group_advantages(rewards_PG, std_normalize=False, eps=1e-6):
    """adv = r - mean_G(r) per prompt (Dr. GRPO); with std_normalize, / (std_G(r) + eps) with the
    population std (GRPO / DAPO z-score). Groups whose G rewards are all equal carry no signal:
    their advantage is exactly 0 and zero_var_mask_P flags them so callers can skip them and log
    zero_var_mask_P.float().mean(). Returns (adv_PG, zero_var_mask_P)."""
    rewards_PG = torch.as_tensor(rewards_PG)
    rewards_PG = rewards_PG.to(torch.promote_types(rewards_PG.dtype, torch.float32))
    zero_var_mask_P = rewards_PG.amax(dim=1) == rewards_PG.amin(dim=1)
    adv_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if std_normalize:
        adv_PG = adv_PG / (rewards_PG.std(dim=1, correction=0, keepdim=True) + eps)
    adv_PG = adv_PG.masked_fill(zero_var_mask_P[:, None], 0.0)  # exact 0, not rounding noise
    return adv_PG, zero_var_mask_P


def kl_estimate(logprobs, ref_logprobs, kind):
    """Per-token estimate of KL(q || p) from tokens sampled from q (the policy), p = reference.
    k1 = log q - log p (unbiased, high variance, can be < 0); k2 = 0.5 (log q - log p)^2 (biased,
    >= 0); k3 = p/q - 1 - log(p/q) (unbiased, >= 0; GRPO's Eq. 4). Not clamped."""
    log_ratio = logprobs - ref_logprobs  # log q - log p
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"kl kind must be k1, k2 or k3, got {kind!r}")


def grpo_loss(logprobs_BT, old_logprobs_BT, advantages_B, mask_BT, *, norm="token",
              clip_low=0.2, clip_high=0.28, ref_logprobs_BT=None, kl="none", kl_coef=0.0,
              max_len=None, num_tokens=None, num_seqs=None):
    """Clipped policy-gradient loss (to minimise) for sampled tokens; returns (loss, stats).

    logprobs_BT: current policy's log-probs of the sampled tokens (with grad); old_logprobs_BT:
    the sampler's (no grad); advantages_B: one per sequence; mask_BT: 1 on trained tokens (the
    worker's own tokens incl. EOS; prompt, pad and REPL/sub-call output are 0).
    With old == current (one update per rollout batch) the ratio is 1, the clip is inactive and
    the gradient is REINFORCE with the group baseline: -sum A_i grad log pi / normaliser.
    KL as a loss, with samples from the policy: grad k3 estimates the FORWARD KL(ref || policy)
    gradient, grad k2 the reverse KL(policy || ref), grad k1 is zero in expectation.
    norm: "seq" (GRPO: token-mean per sequence, then mean over sequences; num_seqs if given),
    "token" (DAPO: sum / number of trained tokens; pass the global num_tokens under gradient
    accumulation), "const" (Dr. GRPO: sum / (num_seqs * max_len), max_len the generation budget).
    """
    mask_BT = mask_BT.to(logprobs_BT.dtype)
    adv_B1 = advantages_B.to(logprobs_BT.dtype).reshape(-1, 1)
    # ratio pi/pi_old per token; the sampler's log-probs are constants
    ratio_BT = torch.exp(logprobs_BT - old_logprobs_BT.detach())
    # asymmetric clip (DAPO clip-higher): the pessimistic min keeps the clipped side gradient-free
    surr_BT = ratio_BT * adv_B1
    surr_clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_B1
    loss_BT = -torch.minimum(surr_BT, surr_clipped_BT)
    # optional per-token KL to the reference, in the loss (GRPO), not in the reward (PPO)
    kl_BT = None
    if kl != "none":
        assert ref_logprobs_BT is not None, "kl needs ref_logprobs_BT"
        kl_BT = kl_estimate(logprobs_BT, ref_logprobs_BT.detach(), kl)
        loss_BT = loss_BT + kl_coef * kl_BT
    # aggregation: the normaliser is the whole difference between GRPO, DAPO and Dr. GRPO
    B = logprobs_BT.shape[0]
    if norm == "seq":
        per_seq_B = (loss_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1)
        loss = per_seq_B.sum() / (num_seqs or B)
    elif norm == "token":
        loss = (loss_BT * mask_BT).sum() / (num_tokens or mask_BT.sum().clamp(min=1))
    elif norm == "const":
        assert max_len is not None, "norm='const' needs max_len (the generation budget)"
        loss = (loss_BT * mask_BT).sum() / ((num_seqs or B) * max_len)
    else:
        raise ValueError(f"norm must be seq, token or const, got {norm!r}")
    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1)
        clipped_BT = ((ratio_BT > 1.0 + clip_high) & (adv_B1 > 0)) | \
                     ((ratio_BT < 1.0 - clip_low) & (adv_B1 < 0))
        stats = {
            "clip_frac": ((clipped_BT * mask_BT).sum() / n).item(),  # tokens with zero gradient
            "ratio_mean": ((ratio_BT * mask_BT).sum() / n).item(),
            "kl_mean": 0.0 if kl_BT is None else ((kl_BT * mask_BT).sum() / n).item(),
        }
    return loss, stats


def pointwise_mi(logp_NM_N):
    """Per-sample terms of the MI estimate, [N, M]: log p(z_ij|x_i) - log mean_l p(z_ij|x_l).
    Each is <= log N (the l = i term alone gives that bound); unclipped."""
    N = logp_NM_N.shape[0]
    assert logp_NM_N.shape[2] == N, logp_NM_N.shape
    idx_N = torch.arange(N)
    own_NM = logp_NM_N[idx_N, :, idx_N]  # L[i, j, i]
    return own_NM - (torch.logsumexp(logp_NM_N, dim=2) - math.log(N))


def mutual_information(logp_NM_N):
    """Compressor-predictor MI estimate I(X; Z) from sequence log-probs only.
    logp_NM_N[i, j, l] = log p(z_ij | x_l): N contexts, M compressions z_ij ~ p(z | x_i) each,
    scored under every context. I = mean_ij [L[i,j,i] - log((1/N) sum_l exp L[i,j,l])] <= log N,
    so it saturates at log N. As in the paper a negative mean is clipped to 0 (the clip is on the
    mean, not per term). Computed in float64. Returns (mi_nats, mi_bits) as floats."""
    logp_NM_N = torch.as_tensor(logp_NM_N, dtype=torch.float64)
    mi_nats = max(pointwise_mi(logp_NM_N).mean().item(), 0.0)
    return mi_nats, mi_nats / math.log(2.0)


def bits_per_token(mi_bits, lengths):
    """Rate R = I / L: MI bits per output token, L the mean length of the compressions."""
    mean_len = float(torch.as_tensor(lengths, dtype=torch.float64).mean())
    return mi_bits / mean_len if mean_len > 0 else float("nan")


def succinctness(relay_lengths, chunk_lengths=None):
    """Relay length in tokens, or relative to the chunk it summarises (chunk length clamped to
    >= 1). Lower = more succinct; the reward uses it with a negative weight. Returns a float
    tensor [B]."""
    relay_B = torch.as_tensor(relay_lengths, dtype=torch.float32)
    if chunk_lengths is None:
        return relay_B
    return relay_B / torch.as_tensor(chunk_lengths, dtype=torch.float32).clamp(min=1.0)


def normalize_answer(s):
    """Collapse whitespace runs to one space, strip, lowercase."""
    return " ".join(s.split()).lower()


def correctness_reward(pred, gold):
    """1.0 on exact match after `normalize_answer`, else 0.0."""
    return 1.0 if normalize_answer(pred) == normalize_answer(gold) else 0.0

# ----------------------------------------------------------------------------------------------
# End of math. The `--stage rl` loop goes below.
# ----------------------------------------------------------------------------------------------

import copy
import os
import random

import dist
import util


def add_args(p):
    g = p.add_argument_group("rl (GRPO with a compression objective)")
    g.add_argument("--rl-steps", type=int, default=None)
    g.add_argument("--rl-batch", type=int, default=None, help="prompts per step (P)")
    g.add_argument("--rl-samples", type=int, default=4, help="relays per prompt (G)")
    g.add_argument("--rl-lr", type=float, default=None)
    g.add_argument("--reward", default="answer", help="recon | answer | task | mi | correct")
    g.add_argument("--lams", default="0,0.02,0.1", help="succinctness weights, one RL run each")
    g.add_argument("--succinct", default="tokens", help="tokens | relative (relay tokens / chunk tokens)")
    g.add_argument("--adv-std", action="store_true", help="divide advantages by the group std (GRPO; off per Dr. GRPO)")
    g.add_argument("--norm", default="token", help="seq | token | const")
    g.add_argument("--clip-low", type=float, default=0.2)
    g.add_argument("--clip-high", type=float, default=0.28)
    g.add_argument("--kl", default="none", help="none | k3 | k2 (to the starting worker)")
    g.add_argument("--kl-coef", type=float, default=0.0)
    g.add_argument("--ppo-epochs", type=int, default=1, help="updates per batch (>1 makes the clip matter)")


def _evidence(prompt):
    """The chunk's gold evidence for a sub-question: the lines that mention its entity."""
    import opd
    chunk, _, q = prompt.rpartition("\nQuestion: ")
    ent = opd._question_entity(q)
    lines = [l for l in chunk.split("\n") if ent and ent in l]
    return "\n".join(lines) if lines else "none"


class Rewarder:
    """Per-sample rewards for (prompt, relay text) groups, scored by the supervisor (the cloud
    reads the relay, so the cloud judges what it can reconstruct from it)."""

    def __init__(self, sup, sup_tok):
        self.sup, self.tok = sup, sup_tok

    def _mean_logp(self, users, targets):
        import lm
        p = [self.tok.chat([{"role": "user", "content": u}]) for u in users]
        c = [self.tok.encode(t) + [self.tok.eos_id] for t in targets]
        with torch.no_grad():
            lps = lm.token_logprobs(self.sup, p, c)
        return torch.tensor([float(x.mean()) for x in lps])

    def __call__(self, kind, prompts_P, relays_PG):
        import tasks
        P, G = len(prompts_P), len(relays_PG[0])
        flat_p = [p for p in prompts_P for _ in range(G)]
        flat_r = [r for rs in relays_PG for r in rs]
        qs = [p.rpartition("\nQuestion: ")[2] for p in flat_p]
        if kind == "correct":
            r = torch.tensor([correctness_reward(x, tasks.ideal_relay(p)) for x, p in zip(flat_r, flat_p)])
        elif kind == "answer":   # can the cloud answer the sub-question from the relay alone?
            r = self._mean_logp([tasks.subcall_prompt(x, q) for x, q in zip(flat_r, qs)],
                                [tasks.ideal_relay(p) for p in flat_p])
        elif kind == "recon":    # can the cloud reconstruct the gold evidence from the relay alone?
            r = self._mean_logp([tasks.subcall_prompt(x, q) for x, q in zip(flat_r, qs)],
                                [_evidence(p) for p in flat_p])
        elif kind == "mi":       # label-free: pointwise MI of relay z_ij and context x_i, N = P contexts
            import lm
            ctx = [self.tok.chat([{"role": "user", "content": p}]) for p in prompts_P]
            comp = [self.tok.encode(x) + [self.tok.eos_id] for x in flat_r]
            L = torch.zeros(P, G, P)
            with torch.no_grad():
                for l in range(P):
                    lps = lm.token_logprobs(self.sup, [ctx[l]] * len(comp), comp)
                    L[:, :, l] = torch.tensor([float(x.sum()) for x in lps]).view(P, G)
            r = pointwise_mi(L).reshape(-1).float()
        else:
            raise util.UserError(f"unknown --reward '{kind}'; choose recon, answer, task, mi or correct")
        return r.view(P, G)


def sample_batch(a, model, tok, pool, rewarder, reward, step, lam):
    """G relays for each of P pool prompts, rewarded one by one: -> [(prompt ids, completion,
    sampler log-probs, advantage)] for the groups whose rewards differ, and stats."""
    import lm
    rng = random.Random(a.seed * 1_000_003 + step)
    prompts = [pool[rng.randrange(len(pool))]["prompt"] for _ in range(a.rl_batch)]
    prompts = dist.shard(prompts)  # this rank's groups (a group never spans ranks)
    if not prompts:
        return [], {}
    ids = [tok.chat([{"role": "user", "content": p}]) for p in prompts]
    G = a.rl_samples
    ro = lm.rollout(model, ids, a.relay_tokens, temperature=1.0, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                    num_samples=G, seed=(a.seed * 7919 + step) * dist.world() + dist.rank())
    texts = [tok.decode(t) for t in ro.tokens]
    recon_PG = rewarder(reward, prompts, [texts[i * G:(i + 1) * G] for i in range(len(prompts))])
    lengths_PG = torch.tensor([float(len(t)) for t in ro.tokens]).view(-1, G)
    cost_PG = lengths_PG / torch.tensor([float(len(i)) for i in ids]).view(-1, 1) if a.succinct == "relative" else lengths_PG
    rewards_PG = recon_PG - lam * cost_PG
    adv_PG, zero_P = group_advantages(rewards_PG, std_normalize=a.adv_std)
    seqs = [(ids[k // G], list(ro.tokens[k]), list(ro.logprobs[k]), float(adv_PG.reshape(-1)[k]))
            for k in range(len(ro.tokens)) if not zero_P[k // G] and len(ro.tokens[k])]
    return seqs, {"zero_var_frac": float(zero_P.float().mean()), "reward": float(rewards_PG.mean()),
                  "relay_tokens": float(lengths_PG.mean())}


def task_batch(a, model, tok, step, lam):
    """The sparse `task` reward: G sampled RLM episodes per training task (planner root, worker at
    temperature 1); every sub-call of an episode shares the episode's score minus lam x its mean
    relay length, and the G episodes of a task form the group."""
    import rlm
    import tasks
    rng = random.Random(a.seed * 1_000_003 + step)
    P, G = max(1, a.rl_batch // 2), a.rl_samples
    group = [tasks.generate_tasks(1, rng.choice(a.families), a.short_chars, split="train", seed=rng.randrange(1 << 30))[0]
             for _ in range(P)]
    group = dist.shard(group)
    if not group:
        return [], {}
    P = len(group)
    ep = rlm.Endpoint("worker", model, tok, False, a.relay_tokens, temperature=1.0,
                      window=model.config.max_position_embeddings, seed=(a.seed * 7919 + step) * dist.world() + dist.rank())
    trajs = rlm.RLM(None, ep, lines_per_chunk=a.lines_per_chunk, max_subcalls=a.max_subcalls,
                    timeout_s=a.repl_timeout).run_many([t for t in group for _ in range(G)], "rl", a.concurrency)
    relay = torch.tensor([t.ledger()["relay_tokens"] / max(1, t.ledger()["subcalls"]) for t in trajs]).view(P, G)
    rewards_PG = torch.tensor([t.score for t in trajs]).view(P, G) - lam * relay
    adv_PG, zero_P = group_advantages(rewards_PG, std_normalize=a.adv_std)
    seqs = []
    for k, t in enumerate(trajs):
        if zero_P[k // G]:
            continue
        for c in t.calls:
            if c["role"] == "sub" and c["tokens"]:
                seqs.append((tok.chat([{"role": "user", "content": c["prompt"]}]), c["tokens"], c["logprobs"],
                             float(adv_PG.reshape(-1)[k])))
    return seqs, {"zero_var_frac": float(zero_P.float().mean()), "reward": float(rewards_PG.mean()),
                  "relay_tokens": float(relay.mean())}


def rl_loss(a, model, ref, seqs, n_seq, n_tok):
    """GRPO loss of this rank's sequences (normalised by the global counts), backpropagated
    `--micro-batch` sequences at a time (the normalisers are global, so the gradient is the same)."""
    import lm
    model.train()
    mb = a.micro_batch or len(seqs)
    total, stats = torch.zeros(()), []
    for k in range(0, len(seqs), mb):
        p_ids, comps, old_lps, adv = (list(x) for x in zip(*seqs[k:k + mb]))
        old = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in old_lps], batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(c)) for c in comps], batch_first=True)
        ref_lp = None
        if ref is not None:
            with torch.no_grad():
                ref_lp = torch.nn.utils.rnn.pad_sequence(lm.token_logprobs(ref, p_ids, comps), batch_first=True)
        new = torch.nn.utils.rnn.pad_sequence(lm.token_logprobs(model, p_ids, comps), batch_first=True)
        loss, st = grpo_loss(new, old, torch.tensor(adv), mask, norm=a.norm, clip_low=a.clip_low, clip_high=a.clip_high,
                             ref_logprobs_BT=ref_lp, kl=a.kl, kl_coef=a.kl_coef, max_len=a.relay_tokens,
                             num_seqs=n_seq, num_tokens=n_tok)
        loss.backward()
        total = total + loss.detach()
        stats.append((float(mask.sum()), st))
    # token-weighted means of the per-token statistics
    n = sum(w for w, _ in stats)
    return total, {key: sum(w * st[key] for w, st in stats) / max(n, 1.0) for key in stats[0][1]}


def train_rl(args, name, pool, heldout, dev, out_dir, lam, reward):
    """GRPO on the worker from the pretrained checkpoint; returns the trained model, tokenizer."""
    import lm
    import opd
    import train
    a = args
    if a.fsdp and util.is_main():
        print("[rl] --fsdp covers pretrain, sft and opd; the RL worker is replicated on every rank")
    model, tok = lm.load_model(a.worker or os.path.join(a.out, "pretrain", "worker"), a.device, a.dtype, grad_ckpt=a.grad_ckpt)
    sup, sup_tok = lm.load_model(a.supervisor or os.path.join(a.out, "pretrain", "supervisor"), a.device, a.dtype)
    sup.eval().requires_grad_(False)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if a.kl != "none" else None
    import distill
    opt = distill.make_optimizer(model, a.rl_lr, 0.0)
    rewarder = Rewarder(sup, sup_tok)
    metrics = util.Metrics(os.path.join(out_dir, "metrics.jsonl"))
    util.remove(metrics.path)
    metrics.log(step=0, **opd.curve_point(a, model, tok, sup, sup_tok, heldout, dev))
    prog = util.Progress(name, a.rl_steps, quiet=a.quiet)
    for step in range(a.rl_steps):
        if reward == "task":
            seqs, stats = task_batch(a, model, tok, step, lam)
        else:
            seqs, stats = sample_batch(a, model, tok, pool, rewarder, reward, step, lam)
        # every rank saw its own groups: average the stats, normalise by the global counts
        keys = ("zero_var_frac", "reward", "relay_tokens")
        n_groups, *sums = dist.all_sum(float(bool(stats)), *[stats.get(k, 0.0) for k in keys])
        stats = {k: v / max(n_groups, 1.0) for k, v in zip(keys, sums)}
        n_seq, n_tok = dist.all_sum(float(len(seqs)), float(sum(len(s[1]) for s in seqs)))
        if n_seq > 0:
            for g in opt.param_groups:
                g["lr"] = util.cosine_lr(step, a.rl_steps, a.rl_lr, min(10, a.rl_steps // 10 + 1))
            for _ in range(a.ppo_epochs):
                loss, st = rl_loss(a, model, ref, seqs, n_seq, n_tok) if seqs else (None, {})
                dist.sync_grads(model.parameters())
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            model.eval()
            stats.update(loss=dist.all_sum(float(loss.detach()) if loss is not None else 0.0), **st)
        metrics.log(step=step + 1, **stats)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.rl_steps:
            metrics.log(step=step + 1, **opd.curve_point(a, model, tok, sup, sup_tok, heldout, dev))
        prog.update(step + 1, reward=stats["reward"])
    prog.close()
    lm.save_checkpoint(os.path.join(out_dir, "worker"), model, tok, {"variant": name, "lam": lam, "reward": reward})
    return model, tok


def stage_rl(args):
    import lm
    import opd
    import rlm
    import train
    d = os.path.join(args.out, "rl")
    pool = opd.prompt_pool(rlm.load_trajectories(os.path.join(args.out, "collect", "rlm-edge.jsonl")))
    heldout, dev = train.heldout_relays(args), rlm.dev_tasks(args)
    rows = []
    runs = [(f"rl(lam={float(lam):g})", float(lam), args.reward) for lam in args.lams.split(",")]
    runs.append(("rl-correct", 0.0, "correct"))          # the RL baseline the OPD comparison plots
    for name, lam, reward in runs:
        vd = os.path.join(d, name)
        if os.path.exists(os.path.join(vd, "worker", "meta.json")):
            model, tok = lm.load_model(os.path.join(vd, "worker"), args.device, args.dtype)
        else:
            model, tok = train_rl(args, name, pool, heldout, dev, vd, lam, reward)
        rows += rlm.eval_worker(args, model, tok, f"rlm-edge+{name}", extra={"lam": lam, "reward": reward})
    return {"rows": rows}
