"""Distillation: a worker (student) LM is taught by a supervisor (teacher) LM.

Run the tests with `python -m pytest -q tests/test_distill_losses.py` (CPU, seconds). The module
has no entry point: training scripts import the losses.

What the loss section covers (every loss states its direction and its support):
- Full vocabulary, per position: forward_kl = KL(p_T || p_S) (mass-covering, GKD beta=0),
  reverse_kl = KL(p_S || p_T) (mode-seeking, GKD beta=1), generalized_jsd (GKD JSD(beta)).
  They gather only the masked positions and run `chunk_tokens` of them at a time under activation
  checkpointing, so no more than [chunk_tokens, V] float32 (plus a few temporaries of that size) is
  alive at once, forwards or backwards. Backward pays one extra softmax per chunk for this.
- Top-k + tail: forward_kl_topk / reverse_kl_topk on the teacher's top-k entries plus one bucket
  holding the rest of the mass (what a teacher server returning top-k log-probs gives you).
- Sampled token: sampled_reverse_kl (the on-policy distillation signal, one teacher log-prob per
  token) and importance_sampling_loss, which turns its negative into a policy gradient.
- Different tokenizers: uld_loss (sorted, zero-padded L1), and TRL GOLD-style align_by_bytes ->
  merge_group_logprobs -> hybrid_loss, wrapped by cross_tokenizer_loss.
- completion_mask: 1 up to and including the first EOS, even when pad_id == eos_id.

How: logits are divided by `temperature` (no T^2 factor), then everything is computed in float32
(float64 if an input is float64; bf16 is upcast). Reductions are the sum over masked positions
divided by `num_tokens` (the global count of masked tokens in the optimiser step, across micro-
batches and ranks) or, if it is None, by mask.sum().clamp_min(1).

What it does not do:
- No shifting: pass logits and mask already aligned (logits[:, :-1] against labels[:, 1:]); row t
  is the distribution that predicts token t.
- No GKD sequence-level 1/L_y averaging: token-level normalisation only.
- KL/JSD require Vs == Vt: slice off the teacher's padded vocab entries first (notes pitfall 5).
- No fused kernels, no "bayesian" merge strategy, no discounting of the sampled-token signal, no
  PPO-style ratio clipping.

Shape legend: B batch, T positions, V vocabulary (Vs student, Vt teacher), P = B*T flattened
positions, N masked positions, C a chunk of them, K top-k entries (+1 tail), G aligned token groups.
"""

import math
import os
import random

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import dist
import util

# =================================================================================================
# LOSSES: divergences, masks, cross-tokenizer alignment (few-shot / SFT code goes below this section)
# =================================================================================================


def _compute_dtype(*tensors):
    """float32, or float64 if any input is float64 (bf16/fp16 inputs are upcast to float32)."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _kl(logp_CV, logq_CV):
    """sum_v p (log p - log q) per row, p = exp(logp). No normalisation is assumed (hybrid_loss)."""
    # a -inf logit (masked vocab entry) must give 0 * log 0 = 0, not NaN, in value and gradient
    lowest = torch.finfo(logp_CV.dtype).min
    logp_CV, logq_CV = logp_CV.clamp_min(lowest), logq_CV.clamp_min(lowest)
    return (logp_CV.exp() * (logp_CV - logq_CV)).sum(-1)


def _jsd(s_logp_CV, t_logp_CV, beta):
    """GKD JSD(beta) per row: beta KL(p_T||M) + (1-beta) KL(p_S||M), M = beta p_T + (1-beta) p_S.

    JSD(beta) ~ beta * KL(p_T||p_S) as beta -> 0, so it tends to 0, not to forward KL: the endpoints
    are special-cased to the plain KLs on purpose (a discontinuity, as in TRL), not a limit.
    """
    if beta == 0:
        return _kl(t_logp_CV, s_logp_CV)  # forward KL(p_T || p_S)
    if beta == 1:
        return _kl(s_logp_CV, t_logp_CV)  # reverse KL(p_S || p_T)
    # log M = logsumexp(log p_T + log beta, log p_S + log(1 - beta)); logaddexp is the 2-term case
    m_logp_CV = torch.logaddexp(t_logp_CV + math.log(beta), s_logp_CV + math.log1p(-beta))
    return beta * _kl(t_logp_CV, m_logp_CV) + (1 - beta) * _kl(s_logp_CV, m_logp_CV)


def _sorted_l1(p_CV, q_CW):
    """ULD per row: L1 between both vectors sorted decreasingly, the shorter one zero-padded."""
    width = max(p_CV.shape[-1], q_CW.shape[-1])
    p_sorted = F.pad(p_CV.sort(-1, descending=True).values, (0, width - p_CV.shape[-1]))
    q_sorted = F.pad(q_CW.sort(-1, descending=True).values, (0, width - q_CW.shape[-1]))
    return (p_sorted - q_sorted).abs().sum(-1)


def _check_same_vocab(student_logits, teacher_logits):
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"vocab sizes differ ({student_logits.shape[-1]} vs {teacher_logits.shape[-1]}): "
                         "slice padded entries off, or use uld_loss / cross_tokenizer_loss")


def _masked_token_sum(row_fn, student_logits, teacher_logits, mask, temperature, num_tokens, chunk_tokens):
    """sum over positions with mask != 0 of mask * row_fn(student_CV, teacher_CV), / token count.

    row_fn gets temperature-scaled logits in the compute dtype. Only masked rows are gathered, by
    index, chunk_tokens at a time; masked-out rows are never read (NaN there is harmless).
    """
    dtype = _compute_dtype(student_logits, teacher_logits)
    student_PV = student_logits.flatten(0, -2)
    teacher_PV = teacher_logits.flatten(0, -2)
    mask_P = mask.reshape(-1).to(dtype)
    idx_N = mask_P.nonzero().squeeze(1)

    def chunk_sum(student_PV, teacher_PV, idx_C):
        student_CV = student_PV[idx_C].to(dtype) / temperature
        teacher_CV = teacher_PV[idx_C].to(dtype) / temperature
        return (row_fn(student_CV, teacher_CV) * mask_P[idx_C]).sum()

    # with autograd on, recompute each chunk in backward instead of keeping its [C, V] activations
    recompute = torch.is_grad_enabled() and (student_logits.requires_grad or teacher_logits.requires_grad)
    total = student_PV[:0].sum().to(dtype)  # a zero that stays in the graph (all-masked batches)
    for start in range(0, idx_N.numel(), chunk_tokens):
        idx_C = idx_N[start:start + chunk_tokens]
        if recompute:
            total = total + checkpoint(chunk_sum, student_PV, teacher_PV, idx_C, use_reentrant=False)
        else:
            total = total + chunk_sum(student_PV, teacher_PV, idx_C)
    return total / (mask.sum().clamp_min(1) if num_tokens is None else num_tokens)


def generalized_jsd(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0, num_tokens=None,
                    chunk_tokens=1024):
    """GKD generalised JSD(beta) between p_T and p_S over the full vocabulary, masked token mean.

    student_logits [B, T, V], teacher_logits [B, T, V], mask [B, T] -> scalar. beta=0 is exactly
    forward_kl, beta=1 exactly reverse_kl (see _jsd for why that is a jump, not a limit).
    """
    _check_same_vocab(student_logits, teacher_logits)

    def row_fn(student_CV, teacher_CV):
        return _jsd(F.log_softmax(student_CV, -1), F.log_softmax(teacher_CV, -1), beta)

    return _masked_token_sum(row_fn, student_logits, teacher_logits, mask, temperature, num_tokens, chunk_tokens)


def forward_kl(student_logits, teacher_logits, mask, temperature=1.0, num_tokens=None, chunk_tokens=1024):
    """Forward KL(p_T || p_S), full vocabulary, masked token mean. Mass-covering: the student is
    punished for missing any teacher mode (GKD beta=0, SDFT's code). [B,T,V], [B,T,V], [B,T] -> scalar."""
    return generalized_jsd(student_logits, teacher_logits, mask, 0.0, temperature, num_tokens, chunk_tokens)


def reverse_kl(student_logits, teacher_logits, mask, temperature=1.0, num_tokens=None, chunk_tokens=1024):
    """Reverse KL(p_S || p_T), full vocabulary, masked token mean. Mode-seeking: the student is
    punished for mass where the teacher has little (GKD beta=1, TRL on-policy default)."""
    return generalized_jsd(student_logits, teacher_logits, mask, 1.0, temperature, num_tokens, chunk_tokens)


def uld_loss(student_logits, teacher_logits, mask, temperature=1.0, num_tokens=None, chunk_tokens=1024):
    """Universal Logit Distillation: per position, L1 between p_S and p_T each sorted decreasingly,
    the shorter zero-padded to max(Vs, Vt). Symmetric, needs no shared vocabulary (Vs != Vt is fine);
    ignores which token is which. [B,T,Vs], [B,T,Vt], [B,T] -> scalar."""

    def row_fn(student_CV, teacher_CV):
        return _sorted_l1(F.softmax(student_CV, -1), F.softmax(teacher_CV, -1))

    return _masked_token_sum(row_fn, student_logits, teacher_logits, mask, temperature, num_tokens, chunk_tokens)


def topk_tail(teacher_logits, student_logits, k):
    """Reduce both distributions to the teacher's top-k entries plus one tail bucket.

    [..., V], [..., V] -> (teacher_logp [..., k+1], student_logp [..., k+1]), normalised log-probs;
    the tail holds each distribution's mass outside the teacher's top-k. With k >= V there is no
    tail and the full log-probs come back. Lumping entries loses information, so any KL on the
    reduced pair is <= the full-vocabulary KL (data processing inequality).
    """
    dtype = _compute_dtype(teacher_logits, student_logits)
    teacher_logp = F.log_softmax(teacher_logits.to(dtype), -1)
    student_logp = F.log_softmax(student_logits.to(dtype), -1)
    if k >= teacher_logp.shape[-1]:
        return teacher_logp, student_logp
    idx_K = teacher_logp.topk(k, dim=-1).indices

    def reduce(logp):
        tail = logp.scatter(-1, idx_K, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([logp.gather(-1, idx_K), tail], -1)

    return reduce(teacher_logp), reduce(student_logp)


def forward_kl_topk(student_logits, teacher_logits, mask, k, temperature=1.0, num_tokens=None, chunk_tokens=1024):
    """Forward KL(p_T || p_S) on teacher-top-k + tail support (<= forward_kl; equal when k >= V)."""
    _check_same_vocab(student_logits, teacher_logits)

    def row_fn(student_CV, teacher_CV):
        teacher_logp_CK, student_logp_CK = topk_tail(teacher_CV, student_CV, k)
        return _kl(teacher_logp_CK, student_logp_CK)

    return _masked_token_sum(row_fn, student_logits, teacher_logits, mask, temperature, num_tokens, chunk_tokens)


def reverse_kl_topk(student_logits, teacher_logits, mask, k, temperature=1.0, num_tokens=None, chunk_tokens=1024):
    """Reverse KL(p_S || p_T) on teacher-top-k + tail support (<= reverse_kl; equal when k >= V)."""
    _check_same_vocab(student_logits, teacher_logits)

    def row_fn(student_CV, teacher_CV):
        teacher_logp_CK, student_logp_CK = topk_tail(teacher_CV, student_CV, k)
        return _kl(student_logp_CK, teacher_logp_CK)

    return _masked_token_sum(row_fn, student_logits, teacher_logits, mask, temperature, num_tokens, chunk_tokens)


def sampled_reverse_kl(student_logprobs, teacher_logprobs, mask):
    """Per-token sampled reverse KL, log p_S(y_t) - log p_T(y_t), on tokens y_t sampled from p_S.

    [B, T], [B, T], [B, T] -> [B, T], zero where mask == 0. Its expectation under the student is
    KL(p_S || p_T) at each position. This is the on-policy distillation signal (Thinking Machines /
    Tinker): use the sampler's log-probs for the student and the teacher's log-probs of the same ids
    (shifted by one like any next-token log-prob). It is an RL advantage, not a loss to backprop:
    A_t = -(log p_S - log p_T) (discount 0); A_t > 0 means the teacher gives the token more
    probability than the student, so the teacher prefers it. Feed A_t to importance_sampling_loss.
    """
    dtype = _compute_dtype(student_logprobs, teacher_logprobs)
    diff_BT = student_logprobs.to(dtype) - teacher_logprobs.to(dtype)
    return torch.where(mask != 0, diff_BT * mask, 0.0)


def importance_sampling_loss(new_logprobs, sampler_logprobs, advantages, mask, num_tokens=None):
    """Tinker's importance-sampling loss: -(exp(new - sampler) * A), masked sum / token count.

    [B, T] each -> scalar. At new == sampler the gradient is REINFORCE, -sum_t A_t grad log p(y_t) / N.
    Sampler log-probs and advantages are data: both are detached. No clipping.
    """
    dtype = _compute_dtype(new_logprobs, sampler_logprobs, advantages)
    keep_BT = mask != 0
    log_ratio_BT = torch.where(keep_BT, new_logprobs.to(dtype) - sampler_logprobs.to(dtype).detach(), 0.0)
    advantages_BT = torch.where(keep_BT, advantages.to(dtype).detach(), 0.0)
    loss_sum = -(log_ratio_BT.exp() * advantages_BT * mask.to(dtype)).sum()
    return loss_sum / (mask.sum().clamp_min(1) if num_tokens is None else num_tokens)


def completion_mask(completion_ids_BT, eos_id, pad_id):
    """[B, T] float mask: 1 up to and including the first EOS, 0 after it; padding is 0.

    An EOS is never treated as padding, so with pad_id == eos_id the first EOS is kept (masking it
    was the classic bug: the student never learned to stop, notes pitfall 4). eos_id may be a list.
    """
    is_eos_BT = torch.isin(completion_ids_BT, torch.as_tensor(eos_id, device=completion_ids_BT.device))
    eos_before_BT = is_eos_BT.long().cumsum(1) - is_eos_BT.long()  # EOS count strictly before t
    is_pad_BT = (completion_ids_BT == pad_id) & ~is_eos_BT
    return ((eos_before_BT == 0) & ~is_pad_BT).float()


def align_by_bytes(student_offsets, teacher_offsets):
    """Group two tokenizations of the same UTF-8 bytes so that each group covers the same bytes.

    Offsets are per-token (start_byte, end_byte). Two pointers: add the token that ends earlier to
    the open group (both on a tie), and close the group when both sides end on the same byte. A
    zero-width token (BOS at (0, 0)) just joins the group open on its side; one-sided leftovers at
    the end join the last group, so every group has tokens on both sides.
    Returns [(student_idx_list, teacher_idx_list), ...].
    """
    groups, group_s, group_t = [], [], []
    i = j = 0
    while i < len(student_offsets) and j < len(teacher_offsets):
        s_end, t_end = student_offsets[i][1], teacher_offsets[j][1]
        if s_end <= t_end:
            group_s.append(i)
            i += 1
        if t_end <= s_end:
            group_t.append(j)
            j += 1
        if s_end == t_end:
            groups.append((group_s, group_t))
            group_s, group_t = [], []
    group_s += range(i, len(student_offsets))
    group_t += range(j, len(teacher_offsets))
    if groups and not (group_s and group_t):
        groups[-1] = (groups[-1][0] + group_s, groups[-1][1] + group_t)
    elif group_s or group_t:
        groups.append((group_s, group_t))
    return groups


def merge_group_logprobs(logprobs_TV, token_ids_T, groups_side):
    """Chain-rule ("observed") merge: one unnormalised log-distribution per token group.

    logprobs_TV [T, V] (row i predicts token i), token_ids_T [T], groups_side = list of index lists.
    For a group [i0, i1, ..., ik]: logprobs_TV[i0] + sum_{j>=1} logprobs_TV[ij, token_ij], i.e.
    P(y | ctx) * P(token_i1 | ..) * ... over the first token's vocabulary. Rows are deliberately
    not renormalised (GOLD). Returns [G, V].
    """
    token_logp_T = logprobs_TV.gather(1, token_ids_T.long().unsqueeze(1)).squeeze(1)
    device = logprobs_TV.device
    first_G = torch.tensor([g[0] for g in groups_side], dtype=torch.long, device=device)
    later = torch.tensor([i for g in groups_side for i in g[1:]], dtype=torch.long, device=device)
    owner = torch.tensor([gi for gi, g in enumerate(groups_side) for _ in g[1:]], dtype=torch.long, device=device)
    extra_G = logprobs_TV.new_zeros(len(groups_side)).index_add(0, owner, token_logp_T[later])
    return logprobs_TV[first_G] + extra_G.unsqueeze(1)


def hybrid_loss(student_logp_GV, teacher_logp_GV, matched_student_ids, matched_teacher_ids, beta=0.5):
    """GOLD hybrid loss on merged groups, mean over groups.

    Vocab entries whose strings match in both tokenizers (aligned id lists) get JSD(beta) on the raw
    probability sub-vectors (no renormalisation; beta 0/1 are the plain KLs); the other entries get
    sorted zero-padded L1 (ULD). Weights w_m = n_matched / Vt, w_u = 1 - w_m.
    [G, Vs], [G, Vt] -> scalar.
    """
    dtype = _compute_dtype(student_logp_GV, teacher_logp_GV)
    student_logp_GV, teacher_logp_GV = student_logp_GV.to(dtype), teacher_logp_GV.to(dtype)
    device = student_logp_GV.device
    matched_s = torch.as_tensor(matched_student_ids, dtype=torch.long, device=device)
    matched_t = torch.as_tensor(matched_teacher_ids, dtype=torch.long, device=device)
    jsd_G = _jsd(student_logp_GV[:, matched_s], teacher_logp_GV[:, matched_t], beta)
    rest_s = torch.ones(student_logp_GV.shape[-1], dtype=torch.bool, device=device).index_fill(0, matched_s, False)
    rest_t = torch.ones(teacher_logp_GV.shape[-1], dtype=torch.bool, device=device).index_fill(0, matched_t, False)
    uld_G = _sorted_l1(student_logp_GV[:, rest_s].exp(), teacher_logp_GV[:, rest_t].exp())
    w_matched = matched_t.numel() / teacher_logp_GV.shape[-1]
    return (w_matched * jsd_G + (1 - w_matched) * uld_G).mean()


def cross_tokenizer_loss(student_logits_TV, teacher_logits_TV, student_ids_T, teacher_ids_T, student_offsets,
                         teacher_offsets, matched_student_ids=None, matched_teacher_ids=None, beta=0.5,
                         temperature=1.0):
    """One sequence, two tokenizers: align by bytes -> chain-rule merge -> hybrid (or pure ULD when
    no matched ids are given), mean over groups. Pass the completion tokens only: row i of each
    [T, V] logits predicts token i, and offsets index the completion's UTF-8 bytes."""
    dtype = _compute_dtype(student_logits_TV, teacher_logits_TV)
    student_logp_TV = F.log_softmax(student_logits_TV.to(dtype) / temperature, -1)
    teacher_logp_TV = F.log_softmax(teacher_logits_TV.to(dtype) / temperature, -1)
    groups = align_by_bytes(student_offsets, teacher_offsets)
    student_GV = merge_group_logprobs(student_logp_TV, student_ids_T, [g[0] for g in groups])
    teacher_GV = merge_group_logprobs(teacher_logp_TV, teacher_ids_T, [g[1] for g in groups])
    if matched_student_ids is None:
        return _sorted_l1(student_GV.exp(), teacher_GV.exp()).mean()
    return hybrid_loss(student_GV, teacher_GV, matched_student_ids, matched_teacher_ids, beta)


# =================================================================================================
# END OF LOSSES
# =================================================================================================


# ==============================================================================================
# Supervised fine-tuning on completions (pretraining from scratch and SFT share this loop)
#
# Examples are (prompt_ids, completion_ids) pairs; the loss is the token-mean cross-entropy on the
# completion tokens only (EOS included). Prompt tokens, and therefore any REPL output or chunk text
# inside a prompt, are never trained on.

def pad_examples(examples, pad_id, prompt_weight=0.0):
    """Right-pad (prompt, completion) pairs -> input_ids_BT, attention_BT, target_mask_BT, where
    target_mask is 1 on completion tokens (the positions whose token is predicted and trained) and
    `prompt_weight` on prompt tokens after the first (0 for SFT; pretraining from scratch uses 1:
    predicting a name's second mention in a document is what teaches the model to copy)."""
    T = max(len(p) + len(c) for p, c in examples)
    B = len(examples)
    ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    attn_BT = torch.zeros(B, T, dtype=torch.long)
    tmask_BT = torch.zeros(B, T)
    for i, (p, c) in enumerate(examples):
        n = len(p) + len(c)
        ids_BT[i, :n] = torch.tensor(p + c)
        attn_BT[i, :n] = 1
        tmask_BT[i, 1:len(p)] = prompt_weight
        tmask_BT[i, len(p):n] = 1.0
    return ids_BT, attn_BT, tmask_BT


def completion_nll(model, ids_BT, attn_BT, tmask_BT, num_tokens=None, chunk_tokens=None):
    """Weighted NLL of the target tokens / num_tokens (a global count under gradient accumulation).
    The lm_head runs only at the M positions with a non-zero weight, in chunks that are recomputed
    in backward, so a 150k vocabulary never makes [batch, length, vocab] float32 logits."""
    import lm
    dev = next(model.parameters()).device
    ids_BT, attn_BT, tmask_BT = ids_BT.to(dev), attn_BT.to(dev), tmask_BT.to(dev)
    hidden_BTD = lm.hidden_states(model, ids_BT, attn_BT)
    sel_BT = tmask_BT[:, 1:] > 0                      # position t predicts token t + 1
    hidden_MD, tgt_M, w_M = hidden_BTD[:, :-1][sel_BT], ids_BT[:, 1:][sel_BT], tmask_BT[:, 1:][sel_BT]

    def chunk_nll(h_CD, tgt_C, w_C):
        return (F.cross_entropy(model.lm_head(h_CD).float(), tgt_C, reduction="none") * w_C).sum()

    denom = num_tokens if num_tokens is not None else tmask_BT[:, 1:].sum().clamp_min(1)
    chunk = chunk_tokens or max(1, 2 ** 24 // model.lm_head.out_features)  # ~64 MB of float32 logits
    if tgt_M.shape[0] <= chunk:  # one chunk (small vocabularies): nothing to save by recomputing
        return chunk_nll(hidden_MD, tgt_M, w_M) / denom
    total = hidden_MD.new_zeros((), dtype=torch.float32)
    for s in range(0, tgt_M.shape[0], chunk):
        total = total + checkpoint(chunk_nll, hidden_MD[s:s + chunk], tgt_M[s:s + chunk], w_M[s:s + chunk],
                                   use_reentrant=False)
    return total / denom


def micro_batches(batch, max_rows, max_tokens):
    """Split a batch into length-sorted micro-batches of at most `max_rows` rows and about
    `max_tokens` padded tokens, so one long example does not pad the whole batch to its length."""
    out, cur = [], []
    for ex in sorted(batch, key=lambda e: len(e[0]) + len(e[1])):
        n = len(ex[0]) + len(ex[1])
        if cur and (len(cur) >= max_rows or (len(cur) + 1) * n > max_tokens):
            out.append(cur)
            cur = []
        cur.append(ex)
    return out + [cur] if cur else out


def make_optimizer(model, lr, weight_decay, optimizer="adamw", muon_lr=0.02):
    if optimizer == "muon":              # pretraining from scratch (muon.py)
        import muon
        return muon.for_model(model, lr, muon_lr, weight_decay)
    # decay matrices only: norms and biases keep their scale
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def fit(model, examples, *, steps, batch_size, lr, warmup=20, weight_decay=0.1, grad_clip=1.0, seed=0,
        optimizer="adamw", muon_lr=0.02, micro_batch=None, max_batch_tokens=4096, prompt_weight=0.0, state_path=None, ckpt_every=100, metrics=None, eval_fn=None, eval_every=0,
        name="fit", quiet=False, amp=None):
    """AdamW (or Muon, see muon.py) with warmup + cosine, gradient clipping, micro-batches that add up to `batch_size`
    (normalised by the global target-token count; see micro_batches), resumable from `state_path`. Each step's batch
    is drawn from an RNG seeded by (seed, step), so a resumed run sees exactly the batches it
    would have seen. `eval_fn(model) -> dict` is logged every `eval_every` steps (and at 0).
    `amp=torch.bfloat16` runs the forward and backward matmuls in bfloat16 under autocast (weights,
    gradients and optimizer states stay float32): ~1.4x per pretraining step on a CPU with bf16 units.
    Under torchrun each rank trains on its share of the batch and the gradients are summed
    (dist.py); the result equals one process on the whole batch."""
    if not examples:
        raise ValueError("fit: no training examples (all longer than the model's window?)")
    pad_id = 0
    opt = make_optimizer(model, lr, weight_decay, optimizer, muon_lr)
    start = 0
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        dist.load_full_state(model, opt, st["model"], st["opt"])
        start = st["step"]
        if metrics:
            metrics.truncate_after(start - 1)
    elif metrics and eval_fn and eval_every:
        model.eval()
        with dist.gathered(model):
            metrics.log(step=0, **eval_fn(model))
    micro = micro_batch or batch_size
    dev_type = next(model.parameters()).device.type
    dist.broadcast_params(model)
    prog = util.Progress(name, steps, quiet=quiet)
    prog.start = start
    for step in range(start, steps):
        model.train()
        rng = random.Random(seed * 1_000_003 + step)
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        cur_lr = util.cosine_lr(step, steps, lr, warmup)
        for g in opt.param_groups:
            g["lr"] = cur_lr * g.get("lr_mult", 1.0)   # Muon's matrices: their own peak, same schedule
        n_tok = sum(len(c) + prompt_weight * (len(p) - 1) for p, c in batch)
        total = 0.0
        mbs = micro_batches(dist.shard(batch), micro, max_batch_tokens)
        for k in range(dist.n_micro(len(mbs), model)):   # a sharded model: every rank the same count
            if k == len(mbs):
                dist.zero_pass(model)
                continue
            with torch.autocast(dev_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = completion_nll(model, *pad_examples(mbs[k], pad_id, prompt_weight), num_tokens=n_tok)
            loss.backward()
            total += loss.item()
        dist.sync_grads(model.parameters())
        total = dist.all_sum(total)
        gnorm = dist.local(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if metrics:
            metrics.log(step=step + 1, loss=total, lr=cur_lr, grad_norm=float(gnorm))
        if eval_fn and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            with dist.gathered(model):
                ev = eval_fn(model)
            if metrics:
                metrics.log(step=step + 1, **ev)
        if state_path and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            model_sd, opt_sd = dist.full_state(model, opt)
            util.atomic_torch_save({"model": model_sd, "opt": opt_sd, "step": step + 1}, state_path)
        prog.update(step + 1, loss=total)
    prog.close()
    model.eval()
    return model


# ==============================================================================================
# Setting 1: few-shot demonstrations in the worker's prompt

def demo_pool(trajs):
    """(prompt, relay, supervisor mean log-prob) of the supervisor's sub-calls in training episodes
    that ended correct and whose relay says something (not `none`): what is worth relaying."""
    out = []
    for t in trajs:
        if t.score < 1.0:
            continue
        for c in t.calls:
            if c["role"] == "sub" and c["model"] == "supervisor" and c["response"].strip() not in ("", "none"):
                lp = c["logprobs"]
                out.append({"prompt": c["prompt"], "relay": c["response"].strip(), "lp": sum(lp) / max(1, len(lp))})
    return out


def _question_kind(prompt):
    """The sub-question with its entity removed, e.g. 'Who works at ?'."""
    import re
    q = prompt.rpartition("\nQuestion: ")[2]
    return re.sub(r"(was|at|does|is|in) .+?( born| work| based)?\?$", r"\1\2?", q)


def choose_demos(pool, k):
    """The stated rule: for each kind of sub-question, the k demonstrations with the highest
    supervisor log-likelihood (ties: the shorter prompt), so demos cost as few edge tokens as
    possible and show the relay the supervisor is surest of."""
    by_kind = {}
    for d in sorted(pool, key=lambda d: (-d["lp"], len(d["prompt"]))):
        by_kind.setdefault(_question_kind(d["prompt"]), [])
        if len(by_kind[_question_kind(d["prompt"])]) < k:
            by_kind[_question_kind(d["prompt"])].append(d)
    return by_kind


def few_shot_prompt(prompt, demos_by_kind):
    """The worker's sub-call prompt with K demonstrations of the same kind of sub-question in front."""
    demos = demos_by_kind.get(_question_kind(prompt), [])
    parts = [f"Example:\n{d['prompt']}\nAnswer: {d['relay']}" for d in demos]
    return "\n\n".join(parts + [prompt])


def stage_fewshot(args):
    import lm
    import rlm
    trajs = rlm.load_trajectories(os.path.join(args.out, "collect", "rlm-cloud.jsonl"))
    demos = choose_demos(demo_pool(trajs), args.shots)
    util.atomic_write_json(os.path.join(args.out, "fewshot", "demos.json"), demos)
    model, tok = lm.load_model(args.worker or os.path.join(args.out, "pretrain", "worker"), args.device, args.dtype)
    rows = rlm.eval_worker(args, model, tok, "rlm-edge+fewshot", sub_transform=lambda p: few_shot_prompt(p, demos),
                           extra={"shots": args.shots})
    return {"rows": rows, "demo_kinds": len(demos)}


# ==============================================================================================
# Setting 2: many-shot imitation (SFT on the supervisor's relays, or on gold relays)

def stage_sft(args):
    import lm
    import opd
    import report
    import rlm
    import tasks
    import train
    d = os.path.join(args.out, "sft")
    trajs = rlm.load_trajectories(os.path.join(args.out, "collect", "rlm-cloud.jsonl"))
    pairs = [(c["prompt"], c["response"].strip()) for t in trajs for c in t.calls
             if c["role"] == "sub" and c["model"] == "supervisor"]
    heldout, dev = train.heldout_relays(args), rlm.dev_tasks(args)
    sup, sup_tok = lm.load_model(args.supervisor or os.path.join(args.out, "pretrain", "supervisor"), args.device, args.dtype)
    rows, curves = [], []
    for variant, targets in (("sft", pairs), ("sft-gold", [(p, tasks.ideal_relay(p)) for p, _ in pairs])):
        vd = os.path.join(d, variant)
        model, tok = lm.load_model(args.worker or os.path.join(args.out, "pretrain", "worker"), args.device, args.dtype,
                                   grad_ckpt=args.grad_ckpt)
        if args.fsdp:
            dist.fsdp_wrap(model)
        if os.path.exists(os.path.join(vd, "worker", "meta.json")):
            model, tok = lm.load_model(os.path.join(vd, "worker"), args.device, args.dtype)
        else:
            examples = train.encode_examples(tok, targets, model.config.max_position_embeddings)
            metrics = util.Metrics(os.path.join(vd, "metrics.jsonl"))
            fit(model, examples, steps=args.sft_steps, batch_size=args.sft_batch, lr=args.sft_lr, warmup=5,
                weight_decay=0.0, grad_clip=args.grad_clip, seed=args.seed, state_path=os.path.join(vd, "state.pt"),
                micro_batch=args.micro_batch or None, ckpt_every=args.ckpt_every, metrics=metrics, eval_every=args.eval_every, name=variant, quiet=args.quiet,
                eval_fn=lambda m: opd.curve_point(args, m, tok, sup, sup_tok, heldout, dev))
            # FLOPs for the compute-matched curves: 6N per trained token (the supervisor's cost of
            # writing the relays was paid once in the collect stage and is not counted here)
            per_step = 6 * lm.param_count(model) * args.sft_batch * sum(len(p) + len(c) for p, c in examples) / len(examples)
            util.write_jsonl(metrics.path, [dict(r, flops=per_step * r["step"]) for r in util.read_jsonl(metrics.path)])
            lm.save_checkpoint(os.path.join(vd, "worker"), model, tok, {"variant": variant, "steps": args.sft_steps})
            util.remove(os.path.join(vd, "state.pt"))
            model, tok = lm.load_model(os.path.join(vd, "worker"), args.device, args.dtype)  # plain, for eval
        rows += rlm.eval_worker(args, model, tok, f"rlm-edge+{variant}", extra={"train_examples": len(targets)})
        curves.append((variant, util.read_jsonl(os.path.join(vd, "metrics.jsonl"))))
    fig = os.path.join(d, "sft_curves.png")
    report.plot_curves(curves, "step", ["relay_acc", "e2e_acc"], fig, "worker optimiser steps")
    return {"rows": rows, "figures": [os.path.relpath(fig, args.out)], "train_pairs": len(pairs)}
