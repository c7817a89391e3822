"""Tests for the loss section of distill.py, against independent float64 numpy references.

The references below use plain loops over positions and never call distill.py. Shapes: B=2, T=5,
V=7 unless a test says otherwise. Run: `python -m pytest -q tests/test_distill_losses.py`.
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill  # noqa: E402

B, T, V = 2, 5, 7
SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny, so intra-op threads only add overhead; on a busy 2-core machine
    they made this file about 4x slower (50 s vs 12 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ independent float64 references

def np_softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def ref_kl(p, q):
    """sum p log(p / q); p need not be normalised."""
    return sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)) if p[i] > 0)


def ref_jsd(ps, pt, beta):
    if beta == 0:
        return ref_kl(pt, ps)
    if beta == 1:
        return ref_kl(ps, pt)
    m = [beta * pt[i] + (1 - beta) * ps[i] for i in range(len(pt))]
    return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)


def ref_sorted_l1(ps, pt):
    n = max(len(ps), len(pt))
    a = sorted(ps, reverse=True) + [0.0] * (n - len(ps))
    b = sorted(pt, reverse=True) + [0.0] * (n - len(pt))
    return sum(abs(a[i] - b[i]) for i in range(n))


def ref_topk(ps, pt, k):
    """Teacher's top-k entries plus a tail bucket, for both distributions."""
    order = sorted(range(len(pt)), key=lambda i: -pt[i])
    top, rest = order[:k], order[k:]
    reduced_t = [pt[i] for i in top] + ([sum(pt[i] for i in rest)] if rest else [])
    reduced_s = [ps[i] for i in top] + ([sum(ps[i] for i in rest)] if rest else [])
    return reduced_s, reduced_t


def ref_masked(per_pos, s, t, mask, temperature=1.0, num_tokens=None):
    """sum over masked (b, i) of per_pos(p_student, p_teacher) / token count, in float64."""
    s, t, mask = (np.asarray(x, dtype=np.float64) for x in (s, t, mask))
    total, count = 0.0, 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask[b, i] != 0:
                total += mask[b, i] * per_pos(np_softmax(s[b, i] / temperature), np_softmax(t[b, i] / temperature))
                count += mask[b, i]
    return total / (num_tokens if num_tokens is not None else max(count, 1.0))


REF = {
    "forward_kl": lambda ps, pt: ref_kl(pt, ps),
    "reverse_kl": lambda ps, pt: ref_kl(ps, pt),
    "uld_loss": ref_sorted_l1,
}
LOSSES = {
    "forward_kl": distill.forward_kl,
    "reverse_kl": distill.reverse_kl,
    "jsd_0.1": lambda s, t, m, **kw: distill.generalized_jsd(s, t, m, beta=0.1, **kw),
    "jsd_0.5": lambda s, t, m, **kw: distill.generalized_jsd(s, t, m, beta=0.5, **kw),
    "jsd_0.9": lambda s, t, m, **kw: distill.generalized_jsd(s, t, m, beta=0.9, **kw),
    "uld_loss": distill.uld_loss,
    "forward_kl_top3": lambda s, t, m, **kw: distill.forward_kl_topk(s, t, m, k=3, **kw),
    "reverse_kl_top3": lambda s, t, m, **kw: distill.reverse_kl_topk(s, t, m, k=3, **kw),
}
for beta in (0.1, 0.5, 0.9):
    REF[f"jsd_{beta}"] = lambda ps, pt, beta=beta: ref_jsd(ps, pt, beta)
REF["forward_kl_top3"] = lambda ps, pt: (lambda rs, rt: ref_kl(rt, rs))(*ref_topk(ps, pt, 3))
REF["reverse_kl_top3"] = lambda ps, pt: (lambda rs, rt: ref_kl(rs, rt))(*ref_topk(ps, pt, 3))


def make_batch(seed, vs=V, vt=V, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(B, T, vs, generator=g)).to(dtype)
    t = (scale * torch.randn(B, T, vt, generator=g)).to(dtype)
    mask = (torch.rand(B, T, generator=g) < 0.7).float()
    mask[0, 0] = 1.0  # at least one token
    return s, t, mask


# ------------------------------------------------------------------ values and gradients

@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_value_matches_reference(name, seed, temperature):
    s, t, mask = make_batch(seed)
    got = LOSSES[name](s, t, mask, temperature=temperature)
    want = ref_masked(REF[name], s, t, mask, temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("vs,vt", [(7, 11), (11, 7), (7, 7)])
@pytest.mark.parametrize("seed", SEEDS)
def test_uld_different_vocab_sizes(vs, vt, seed):
    s, t, mask = make_batch(seed, vs=vs, vt=vt)
    got = distill.uld_loss(s, t, mask, temperature=1.3)
    assert got.item() == pytest.approx(ref_masked(ref_sorted_l1, s, t, mask, 1.3), rel=1e-5)
    # sorted L1 is symmetric: swapping the roles gives the same number
    assert distill.uld_loss(t, s, mask, temperature=1.3).item() == pytest.approx(got.item(), rel=1e-6)


def test_kl_rejects_different_vocab_sizes():
    s, t, mask = make_batch(0, vs=7, vt=9)
    with pytest.raises(ValueError):
        distill.forward_kl(s, t, mask)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("chunk_tokens", [2, 1024])
def test_gradcheck_float64(name, chunk_tokens):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    out = LOSSES[name](s, t, mask, chunk_tokens=chunk_tokens)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: LOSSES[name](a, b, mask, temperature=0.8,
                                                             chunk_tokens=chunk_tokens), (s, t))


def test_gradcheck_uld_different_vocab():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: distill.uld_loss(a, b, mask), (s, t))


@pytest.mark.parametrize("name", list(LOSSES))
def test_zero_when_student_equals_teacher(name):
    s, _, mask = make_batch(5)
    assert abs(LOSSES[name](s, s.clone(), mask).item()) < 1e-6


# ------------------------------------------------------------------ direction on a 3-token vocabulary

def test_forward_and_reverse_kl_direction_three_tokens():
    """Teacher bimodal p_T = [0.49, 0.49, 0.02]. Student A sits on one mode, [0.90, 0.05, 0.05];
    student B spreads evenly, [0.34, 0.33, 0.33].

    By hand (natural log): FKL(A) = .49 ln(.49/.90) + .49 ln(.49/.05) + .02 ln(.02/.05) = 0.8021,
    RKL(A) = .90 ln(.90/.49) + .05 ln(.05/.49) + .05 ln(.05/.02) = 0.4789,
    FKL(B) = 0.3167, RKL(B) = 0.6704.
    Forward KL (mass-covering) prefers the spread student B (0.317 < 0.802); reverse KL
    (mode-seeking) prefers the single-mode student A (0.479 < 0.670); for A, RKL < FKL.
    """
    p_t = torch.tensor([0.49, 0.49, 0.02])
    a = torch.tensor([0.90, 0.05, 0.05])
    b = torch.tensor([0.34, 0.33, 0.33])
    mask = torch.ones(1, 1)

    def kls(q):
        args = (q.log().view(1, 1, 3), p_t.log().view(1, 1, 3), mask)
        return distill.forward_kl(*args).item(), distill.reverse_kl(*args).item()

    fkl_a, rkl_a = kls(a)
    fkl_b, rkl_b = kls(b)
    assert fkl_a == pytest.approx(0.8021, abs=1e-4) and rkl_a == pytest.approx(0.4789, abs=1e-4)
    assert fkl_b == pytest.approx(0.3167, abs=1e-4) and rkl_b == pytest.approx(0.6704, abs=1e-4)
    assert rkl_a < fkl_a
    assert fkl_b < fkl_a  # forward KL: cover both modes
    assert rkl_a < rkl_b  # reverse KL: pick one mode


def test_minus_inf_teacher_logit_gives_finite_loss_and_gradient():
    """A teacher logit of -inf (masked vocab entry) gives p_T = 0 there: 0 * log 0 must count as 0.
    Naive p * (log p - log q) returns NaN in value and gradient."""
    s, t, mask = make_batch(6)
    t[..., 0] = float("-inf")
    s.requires_grad_(True)
    for name in ("forward_kl", "jsd_0.5", "forward_kl_top3"):
        loss = LOSSES[name](s, t, mask)
        (grad,) = torch.autograd.grad(loss, s)
        assert loss.item() == pytest.approx(ref_masked(REF[name], s.detach(), t, mask), rel=1e-5)
        assert torch.isfinite(grad).all()


# ------------------------------------------------------------------ JSD endpoints

@pytest.mark.parametrize("seed", SEEDS)
def test_jsd_endpoints_are_exactly_the_kls(seed):
    s, t, mask = make_batch(seed)
    assert torch.equal(distill.generalized_jsd(s, t, mask, beta=0.0), distill.forward_kl(s, t, mask))
    assert torch.equal(distill.generalized_jsd(s, t, mask, beta=1.0), distill.reverse_kl(s, t, mask))
    assert distill.generalized_jsd(s, t, mask, beta=0).item() == pytest.approx(
        ref_masked(lambda ps, pt: ref_kl(pt, ps), s, t, mask), rel=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_jsd_near_endpoints(seed):
    """JSD(beta) -> beta * FKL as beta -> 0 and (1 - beta) * RKL as beta -> 1, so the plain JSD tends
    to 0 at the ends (the bug of naive code) and the special-cased endpoints are a jump. What is
    continuous is JSD(beta) / beta at 0 and JSD(beta) / (1 - beta) at 1."""
    s, t, mask = make_batch(seed)
    s, t = s.double(), t.double()
    fkl, rkl = distill.forward_kl(s, t, mask).item(), distill.reverse_kl(s, t, mask).item()
    eps = 1e-5
    jsd_lo = distill.generalized_jsd(s, t, mask, beta=eps).item()
    jsd_hi = distill.generalized_jsd(s, t, mask, beta=1 - eps).item()
    assert jsd_lo / eps == pytest.approx(fkl, rel=1e-3)
    assert jsd_hi / eps == pytest.approx(rkl, rel=1e-3)
    assert jsd_lo < 1e-3 * fkl and jsd_hi < 1e-3 * rkl
    # interior: continuous in beta
    mid = distill.generalized_jsd(s, t, mask, beta=0.5).item()
    assert distill.generalized_jsd(s, t, mask, beta=0.5 + 1e-7).item() == pytest.approx(mid, rel=1e-5)


# ------------------------------------------------------------------ masks

def ref_completion_mask(ids, eos_id, pad_id):
    out = []
    for row in ids.tolist():
        m, done = [], False
        for tok in row:
            if done:
                m.append(0.0)
            elif tok == eos_id:
                m.append(1.0)
                done = True
            else:
                m.append(0.0 if tok == pad_id else 1.0)
        out.append(m)
    return torch.tensor(out)


def test_completion_mask_keeps_eos_when_pad_equals_eos():
    """Regression (TRL PR #6357): with pad_id == eos_id, `ids != pad_id` also masked the real EOS,
    so the student was never trained to stop. The first EOS must stay at 1."""
    ids = torch.tensor([[5, 6, 2, 2, 2], [7, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(distill.completion_mask(ids, eos_id=2, pad_id=2), want)


def test_completion_mask_cases():
    ids = torch.tensor([[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 2, 6, 2, 0], [5, 6, 7, 8, 9]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    got = distill.completion_mask(ids, eos_id=2, pad_id=0)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # several EOS ids: the first of any of them ends the completion
    assert distill.completion_mask(torch.tensor([[5, 9, 2, 6]]), eos_id=[2, 9], pad_id=0).tolist() == [[1, 1, 0, 0]]
    g = torch.Generator().manual_seed(0)
    for pad in (0, 2):
        rand_ids = torch.randint(0, 5, (8, 12), generator=g)
        assert torch.equal(distill.completion_mask(rand_ids, 2, pad), ref_completion_mask(rand_ids, 2, pad))


@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_positions_have_no_effect(name):
    """Prompt, post-EOS and padding positions (pad == eos) change neither value nor gradient,
    even when their logits are garbage (NaN)."""
    prompt_len = 2
    completion = torch.tensor([[5, 6, 1, 1, 1], [5, 6, 4, 3, 1]])  # eos = pad = 1
    mask = torch.cat([torch.zeros(2, prompt_len), distill.completion_mask(completion, 1, 1)], 1)  # [2, 7]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 7, V, generator=g, requires_grad=True)
    t = torch.randn(2, 7, V, generator=g)
    loss = LOSSES[name](s, t, mask)
    (grad,) = torch.autograd.grad(loss, s)

    s2 = s.detach().clone()
    t2 = t.clone()
    s2[mask == 0] = float("nan")
    t2[mask == 0] = float("nan")
    s2.requires_grad_(True)
    loss2 = LOSSES[name](s2, t2, mask)
    (grad2,) = torch.autograd.grad(loss2, s2)
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)
    assert torch.all(grad[mask == 0] == 0)
    assert torch.any(grad[mask == 1] != 0)


def test_all_masked_batch_is_zero_and_backward_works():
    s, t, _ = make_batch(0)
    s.requires_grad_(True)
    loss = distill.forward_kl(s, t, torch.zeros(B, T))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_num_tokens_micro_batches_sum_to_full_batch(name):
    s, t, mask = make_batch(7)
    full = LOSSES[name](s, t, mask)
    n = mask.sum()
    parts = [LOSSES[name](s[i:i + 1], t[i:i + 1], mask[i:i + 1], num_tokens=n) for i in range(B)]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-6)
    # without the global count, per-micro-batch means are mis-weighted
    means = [LOSSES[name](s[i:i + 1], t[i:i + 1], mask[i:i + 1]) for i in range(B)]
    assert (means[0] + means[1]).item() != pytest.approx(full.item(), rel=1e-3)


def test_temperature_is_a_logit_division():
    s, t, mask = make_batch(8)
    for fn in (distill.forward_kl, distill.reverse_kl, distill.uld_loss):
        assert fn(s, t, mask, temperature=2.5).item() == pytest.approx(fn(s / 2.5, t / 2.5, mask).item(), rel=1e-6)
    assert distill.forward_kl(s, t, mask, temperature=2.5).item() != pytest.approx(
        distill.forward_kl(s, t, mask).item(), rel=1e-2)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_compute_in_float32(name):
    s, t, mask = make_batch(9)
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = LOSSES[name](s16, t16, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(LOSSES[name](s16.float(), t16.float(), mask).item(), rel=1e-6, abs=1e-7)
    assert got.item() == pytest.approx(LOSSES[name](s, t, mask).item(), rel=3e-2, abs=1e-3)


# ------------------------------------------------------------------ chunking and top-k

@pytest.mark.parametrize("name", list(LOSSES))
def test_chunked_equals_full(name):
    g = torch.Generator().manual_seed(10)
    s = torch.randn(3, 9, 50, generator=g, requires_grad=True)
    t = torch.randn(3, 9, 50, generator=g)
    mask = (torch.rand(3, 9, generator=g) < 0.6).float()
    full = LOSSES[name](s, t, mask, chunk_tokens=10_000)
    (grad_full,) = torch.autograd.grad(full, s)
    for chunk in (1, 4):
        part = LOSSES[name](s, t, mask, chunk_tokens=chunk)
        (grad_part,) = torch.autograd.grad(part, s)
        assert abs(part.item() - full.item()) < 1e-6
        assert torch.allclose(grad_part, grad_full, atol=1e-7)


def test_chunked_path_keeps_no_full_size_activations():
    """Autograd saves nothing bigger than [chunk, V] apart from the input logits themselves."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 16, 1000, generator=g, requires_grad=True)
    t = torch.randn(2, 16, 1000, generator=g)
    mask = torch.ones(2, 16)
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    saved = []

    def pack(x):
        if x.untyped_storage().data_ptr() not in inputs:
            saved.append(x.numel())
        return x

    for fn in (distill.forward_kl, distill.generalized_jsd, distill.uld_loss):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn(s, t, mask, chunk_tokens=8)
        loss.backward()
        assert max(saved) <= 8 * 1000


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_with_k_equal_v_is_full(seed):
    s, t, mask = make_batch(seed)
    fkl, rkl = distill.forward_kl(s, t, mask).item(), distill.reverse_kl(s, t, mask).item()
    assert distill.forward_kl_topk(s, t, mask, k=V).item() == pytest.approx(fkl, abs=1e-7)
    assert distill.reverse_kl_topk(s, t, mask, k=V).item() == pytest.approx(rkl, abs=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_kl_is_at_most_full_kl(seed, k):
    """k < V - 1 strictly loses information; k = V - 1 is lossless (the tail is a single entry)."""
    s, t, mask = make_batch(seed)
    pairs = ((distill.forward_kl_topk, distill.forward_kl), (distill.reverse_kl_topk, distill.reverse_kl))
    for topk_fn, full_fn in pairs:
        per_pos_top = [topk_fn(s[b:b + 1, i:i + 1], t[b:b + 1, i:i + 1], torch.ones(1, 1), k=k).item()
                       for b in range(B) for i in range(T)]
        per_pos_full = [full_fn(s[b:b + 1, i:i + 1], t[b:b + 1, i:i + 1], torch.ones(1, 1)).item()
                        for b in range(B) for i in range(T)]
        assert all(a <= f + 1e-6 for a, f in zip(per_pos_top, per_pos_full))
        assert topk_fn(s, t, mask, k=k).item() < full_fn(s, t, mask).item()
        assert topk_fn(s, t, mask, k=V - 1).item() == pytest.approx(full_fn(s, t, mask).item(), abs=1e-6)


def test_topk_tail_shapes_and_mass():
    s, t, _ = make_batch(12)
    t_logp, s_logp = distill.topk_tail(t, s, 3)
    assert t_logp.shape == s_logp.shape == (B, T, 4)
    assert torch.allclose(t_logp.exp().sum(-1), torch.ones(B, T), atol=1e-6)
    assert torch.allclose(s_logp.exp().sum(-1), torch.ones(B, T), atol=1e-6)
    assert torch.allclose(t_logp[..., :3], torch.log_softmax(t, -1).topk(3, -1).values)


# ------------------------------------------------------------------ sampled token and IS loss

def test_sampled_reverse_kl_per_token_and_advantage_sign():
    s_lp = torch.tensor([[-0.5, -2.0, -1.0, float("-inf")]])
    t_lp = torch.tensor([[-1.0, -0.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    kl = distill.sampled_reverse_kl(s_lp, t_lp, mask)
    assert kl.shape == (1, 4)
    assert kl.tolist() == [[0.5, -1.5, 0.0, 0.0]]  # padding with -inf log-prob gives 0, not nan
    advantage = -kl
    assert advantage[0, 1] > 0  # teacher gives token 1 more probability: teacher prefers it
    assert advantage[0, 0] < 0
    assert distill.sampled_reverse_kl(s_lp, s_lp.clone(), mask).abs().sum() == 0


def test_importance_sampling_loss_value_and_reinforce_gradient():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    sampler = logp.detach().clone()

    loss = distill.importance_sampling_loss(logp, sampler, advantages, mask)
    n = mask.sum().item()
    assert loss.item() == pytest.approx(-sum(advantages[b, i].item() for b in range(B) for i in range(T)
                                             if mask[b, i]) / n, rel=1e-12)
    grad, grad_adv = torch.autograd.grad(loss, (logits, advantages), allow_unused=True, retain_graph=True)
    (want,) = torch.autograd.grad(-(advantages.detach() * logp * mask).sum() / n, logits)
    assert torch.allclose(grad, want, atol=1e-12)
    assert grad_adv is None  # advantages are constants

    # off-policy value: ratio exp(new - sampler), masked positions ignored even if garbage
    sampler2 = sampler + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampler2[mask == 0] = float("inf")
    got = distill.importance_sampling_loss(logp, sampler2, advantages, mask, num_tokens=10).item()
    want_val = -sum(math.exp(logp[b, i].item() - sampler2[b, i].item()) * advantages[b, i].item()
                    for b in range(B) for i in range(T) if mask[b, i]) / 10
    assert got == pytest.approx(want_val, rel=1e-12)
    # micro-batches with the global count add up
    parts = sum(distill.importance_sampling_loss(logp[i:i + 1], sampler2[i:i + 1], advantages[i:i + 1],
                                                 mask[i:i + 1], num_tokens=10) for i in range(B))
    assert parts.item() == pytest.approx(got, rel=1e-12)


# ------------------------------------------------------------------ cross-tokenizer

def offsets_of(pieces):
    """(start, end) byte offsets of consecutive byte-string tokens."""
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


TEXT = "café 日本 🙂".encode("utf-8")  # é 2 bytes, 日 本 3 bytes each, 🙂 4 bytes: 17 bytes
# student splits é, 日 and 🙂 across tokens (byte-level BPE); teacher keeps whole characters
STUDENT_PIECES = [b"caf", b"\xc3", b"\xa9", b" \xe6\x97", b"\xa5\xe6\x9c\xac", b" \xf0\x9f", b"\x99\x82"]
TEACHER_PIECES = [b"ca", b"f\xc3\xa9", b" ", b"\xe6\x97\xa5\xe6\x9c\xac", b" \xf0\x9f\x99\x82"]


def check_groups_cover_same_bytes(groups, s_pieces, t_pieces):
    flat_s = [i for g in groups for i in g[0]]
    flat_t = [j for g in groups for j in g[1]]
    assert flat_s == list(range(len(s_pieces))) and flat_t == list(range(len(t_pieces)))
    for gs, gt in groups:
        assert gs and gt
        assert b"".join(s_pieces[i] for i in gs) == b"".join(t_pieces[j] for j in gt)


def test_align_by_bytes_multibyte_utf8():
    assert b"".join(STUDENT_PIECES) == TEXT == b"".join(TEACHER_PIECES)
    groups = distill.align_by_bytes(offsets_of(STUDENT_PIECES), offsets_of(TEACHER_PIECES))
    assert groups == [([0, 1, 2], [0, 1]), ([3, 4], [2, 3]), ([5, 6], [4])]
    check_groups_cover_same_bytes(groups, STUDENT_PIECES, TEACHER_PIECES)
    # a string-compare alignment would fail here: the student's pieces are not valid UTF-8 alone
    with pytest.raises(UnicodeDecodeError):
        STUDENT_PIECES[1].decode("utf-8")


def test_align_by_bytes_leading_bos_on_one_side():
    """Regression (TRL #4393 -> PR #5885): a BOS (zero-width, at (0, 0)) on one side only must not
    shift the alignment; it joins the first group."""
    s_off = [(0, 0)] + offsets_of(STUDENT_PIECES)
    groups = distill.align_by_bytes(s_off, offsets_of(TEACHER_PIECES))
    assert groups == [([0, 1, 2, 3], [0, 1]), ([4, 5], [2, 3]), ([6, 7], [4])]
    t_off = [(0, 0)] + offsets_of(TEACHER_PIECES)
    groups = distill.align_by_bytes(offsets_of(STUDENT_PIECES), t_off)
    assert groups == [([0, 1, 2], [0, 1, 2]), ([3, 4], [3, 4]), ([5, 6], [5])]
    # BOS on both sides: a group of its own
    groups = distill.align_by_bytes(s_off, t_off)
    assert groups[0] == ([0], [0]) and groups[1] == ([1, 2, 3], [1, 2])


def test_align_by_bytes_trailing_and_middle_zero_width():
    n = len(TEXT)
    # EOS at (n, n) on the student side only: joins the last group
    groups = distill.align_by_bytes(offsets_of(STUDENT_PIECES) + [(n, n)], offsets_of(TEACHER_PIECES))
    assert groups[-1] == ([5, 6, 7], [4])
    # EOS on both sides: its own group
    groups = distill.align_by_bytes(offsets_of(STUDENT_PIECES) + [(n, n)], offsets_of(TEACHER_PIECES) + [(n, n)])
    assert groups[-1] == ([7], [5])
    # a zero-width token in the middle joins the next group
    s_off = offsets_of(STUDENT_PIECES)
    s_off = s_off[:3] + [(5, 5)] + s_off[3:]
    groups = distill.align_by_bytes(s_off, offsets_of(TEACHER_PIECES))
    assert groups == [([0, 1, 2], [0, 1]), ([3, 4, 5], [2, 3]), ([6, 7], [4])]


def test_merge_group_logprobs_hand_example():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    token_ids = torch.tensor([0, 1, 2])
    merged = distill.merge_group_logprobs(probs.log(), token_ids, [[0], [1, 2]])
    # group [1, 2]: row 1 times p(token 2 = id 2 | row 2) = [0.1, 0.6, 0.3] * 0.5
    assert torch.allclose(merged.exp(), torch.tensor([[0.5, 0.3, 0.2], [0.05, 0.3, 0.15]], dtype=torch.float64))
    # group [0, 1, 2]: row 0 times p(id 1 | row 1) = 0.6 times p(id 2 | row 2) = 0.5
    merged = distill.merge_group_logprobs(probs.log(), token_ids, [[0, 1, 2]])
    assert torch.allclose(merged.exp(), torch.tensor([[0.15, 0.09, 0.06]], dtype=torch.float64))


def ref_hybrid(s_logp, t_logp, ms, mt, beta):
    ps, pt = np.exp(np.asarray(s_logp, dtype=np.float64)), np.exp(np.asarray(t_logp, dtype=np.float64))
    w_m = len(mt) / pt.shape[1]
    total = 0.0
    for gi in range(ps.shape[0]):
        jsd = ref_jsd([ps[gi, i] for i in ms], [pt[gi, j] for j in mt], beta) if len(mt) else 0.0
        uld = ref_sorted_l1([ps[gi, i] for i in range(ps.shape[1]) if i not in ms],
                            [pt[gi, j] for j in range(pt.shape[1]) if j not in mt])
        total += w_m * jsd + (1 - w_m) * uld
    return total / ps.shape[0]


def merged_pair(seed, g=4, vs=6, vt=8):
    gen = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(g, vs, generator=gen, dtype=torch.float64), -1) - 0.4  # unnormalised
    t = torch.log_softmax(torch.randn(g, vt, generator=gen, dtype=torch.float64), -1) - 0.2
    return s, t


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_hybrid_loss_partial_match_matches_reference(beta):
    s, t = merged_pair(14)
    ms, mt = [0, 2, 5], [7, 1, 3]
    got = distill.hybrid_loss(s, t, ms, mt, beta=beta).item()
    assert got == pytest.approx(ref_hybrid(s, t, ms, mt, beta), rel=1e-10)
    assert torch.autograd.gradcheck(lambda a, b: distill.hybrid_loss(a, b, ms, mt, beta=beta),
                                    (s.clone().requires_grad_(), t.clone().requires_grad_()))


def test_hybrid_loss_nothing_matched_is_uld():
    s, t = merged_pair(15)
    got = distill.hybrid_loss(s, t, [], [], beta=0.5).item()
    want = np.mean([ref_sorted_l1(list(np.exp(s[g].numpy())), list(np.exp(t[g].numpy()))) for g in range(4)])
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_hybrid_loss_everything_matched_is_jsd(beta):
    gen = torch.Generator().manual_seed(16)
    s = torch.log_softmax(torch.randn(3, 6, generator=gen, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(3, 6, generator=gen, dtype=torch.float64), -1)
    ids = list(range(6))
    got = distill.hybrid_loss(s, t, ids, ids, beta=beta).item()
    want = np.mean([ref_jsd(list(np.exp(s[g].numpy())), list(np.exp(t[g].numpy())), beta) for g in range(3)])
    assert got == pytest.approx(want, rel=1e-10)
    # and with the same logits as a [1, G, V] batch, the full-vocabulary loss agrees
    full_vocab = distill.generalized_jsd(s[None], t[None], torch.ones(1, 3), beta=beta).item()
    assert got == pytest.approx(full_vocab, rel=1e-10)


def test_cross_tokenizer_loss_end_to_end():
    gen = torch.Generator().manual_seed(17)
    s_off, t_off = [(0, 0)] + offsets_of(STUDENT_PIECES), offsets_of(TEACHER_PIECES)
    s_logits = torch.randn(len(s_off), 9, generator=gen, dtype=torch.float64)
    t_logits = torch.randn(len(t_off), 12, generator=gen, dtype=torch.float64)
    s_ids, t_ids = torch.randint(0, 9, (len(s_off),), generator=gen), torch.randint(0, 12, (len(t_off),), generator=gen)

    def ref_merge(logits, ids, groups, temperature):
        logp = np.log(np.stack([np_softmax(row / temperature) for row in logits.numpy()]))
        return np.stack([logp[g[0]] + sum(logp[i, ids[i]] for i in g[1:]) for g in groups])

    groups = [([0, 1, 2, 3], [0, 1]), ([4, 5], [2, 3]), ([6, 7], [4])]
    s_merged = ref_merge(s_logits, s_ids, [g[0] for g in groups], 0.9)
    t_merged = ref_merge(t_logits, t_ids, [g[1] for g in groups], 0.9)
    uld = distill.cross_tokenizer_loss(s_logits, t_logits, s_ids, t_ids, s_off, t_off, temperature=0.9).item()
    want = np.mean([ref_sorted_l1(list(np.exp(s_merged[g])), list(np.exp(t_merged[g]))) for g in range(3)])
    assert uld == pytest.approx(want, rel=1e-10)
    ms, mt = [1, 4, 8], [0, 5, 11]
    hybrid = distill.cross_tokenizer_loss(s_logits, t_logits, s_ids, t_ids, s_off, t_off, ms, mt, beta=0.3,
                                          temperature=0.9).item()
    assert hybrid == pytest.approx(ref_hybrid(s_merged, t_merged, ms, mt, 0.3), rel=1e-10)
    assert torch.autograd.gradcheck(
        lambda a: distill.cross_tokenizer_loss(a, t_logits, s_ids, t_ids, s_off, t_off, ms, mt),
        (s_logits.clone().requires_grad_(),))
