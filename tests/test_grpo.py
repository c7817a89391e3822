"""rl_compress.py math: group advantages, the GRPO loss (normalisations on hand-computed numbers,
REINFORCE equivalence on-policy, clipping), the KL estimators and the direction of their gradients,
the MI estimator, and the reward pieces."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rl_compress as R  # noqa: E402

NORMS = ("seq", "token", "const")


# ----------------------------------------------------------------------------------------------
# advantages

def test_group_advantages_mean_baseline_and_zero_variance():
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [2.0, 0.0, 1.0, 1.0]])
    adv_PG, zero_P = R.group_advantages(rewards_PG)
    torch.testing.assert_close(adv_PG, torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]]))
    assert zero_P.tolist() == [False, True, False]
    assert torch.all(adv_PG[1] == 0)  # exactly 0, not mean-subtraction rounding noise


def test_group_advantages_population_std():
    adv_PG, _ = R.group_advantages([[2.0, 0.0, 1.0, 1.0]], std_normalize=True, eps=0.0)
    std = math.sqrt((1 + 1 + 0 + 0) / 4)  # population std (divide by G), = 0.7071
    torch.testing.assert_close(adv_PG, torch.tensor([[1.0, -1.0, 0.0, 0.0]]) / std)
    adv_PG, zero_P = R.group_advantages([[3, 3, 3]], std_normalize=True)  # ints, all equal
    assert adv_PG.dtype == torch.float32 and torch.all(adv_PG == 0) and zero_P.item()


@pytest.mark.parametrize("norm", NORMS)
def test_equal_rewards_give_zero_gradient(norm):
    torch.manual_seed(0)
    logp_BT = (torch.randn(4, 5) - 2).requires_grad_(True)
    old_BT = logp_BT.detach() + 0.1 * torch.randn(4, 5)  # off-policy too: ratio != 1
    adv_PG, zero_P = R.group_advantages(torch.full((2, 2), 0.7))
    assert zero_P.all()
    loss, _ = R.grpo_loss(logp_BT, old_BT, adv_PG.reshape(-1), torch.ones(4, 5), norm=norm,
                          max_len=8)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp_BT.grad == 0)


# ----------------------------------------------------------------------------------------------
# GRPO loss

def _toy_case():
    """B = 2, T = 3; old = 0 so logp = log(ratio). Sequence 0 has a pad token (mask 0)."""
    ratio_BT = torch.tensor([[1.5, 0.9, 3.0], [0.5, 1.1, 1.4]], dtype=torch.float64)
    mask_BT = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    adv_B = torch.tensor([1.0, -0.5], dtype=torch.float64)
    return ratio_BT.log(), torch.zeros_like(ratio_BT), adv_B, mask_BT


def test_grpo_loss_hand_computed_normalisations():
    # per-token -min(ratio*A, clip(ratio, 0.8, 1.28)*A):
    #   seq 0 (A = 1):    ratio 1.5 -> -1.28 (clipped), 0.9 -> -0.9        sum -2.18, 2 tokens
    #   seq 1 (A = -0.5): 0.5 -> +0.4 (clipped), 1.1 -> +0.55, 1.4 -> +0.7  sum +1.65, 3 tokens
    logp, old, adv, mask = _toy_case()
    loss, stats = R.grpo_loss(logp, old, adv, mask, norm="token")
    assert loss.item() == pytest.approx(-0.106)  # (-2.18 + 1.65) / 5
    loss, _ = R.grpo_loss(logp, old, adv, mask, norm="seq")
    assert loss.item() == pytest.approx(-0.27)  # (-2.18 / 2 + 1.65 / 3) / 2
    loss, _ = R.grpo_loss(logp, old, adv, mask, norm="const", max_len=4)
    assert loss.item() == pytest.approx(-0.06625)  # -0.53 / (2 * 4)
    # gradient accumulation: global counts replace the local ones
    loss, _ = R.grpo_loss(logp, old, adv, mask, norm="token", num_tokens=10)
    assert loss.item() == pytest.approx(-0.053)
    loss, _ = R.grpo_loss(logp, old, adv, mask, norm="seq", num_seqs=4)
    assert loss.item() == pytest.approx(-0.135)
    loss, _ = R.grpo_loss(logp, old, adv, mask, norm="const", max_len=4, num_seqs=4)
    assert loss.item() == pytest.approx(-0.033125)
    assert stats["clip_frac"] == pytest.approx(0.4)  # 2 of 5 trained tokens
    assert stats["ratio_mean"] == pytest.approx(1.08)  # (1.5 + 0.9 + 0.5 + 1.1 + 1.4) / 5
    assert stats["kl_mean"] == 0.0


def test_grpo_loss_hand_computed_k3_term():
    logp, old, adv, mask = _toy_case()
    ref = logp - math.log(2.0)  # log q - log p = log 2 on every token
    loss, stats = R.grpo_loss(logp, old, adv, mask, norm="token", ref_logprobs_BT=ref, kl="k3",
                              kl_coef=0.1)
    # k3 = 1/2 - 1 + log 2 = 0.1931471805599453 per token
    assert stats["kl_mean"] == pytest.approx(0.1931471805599453)
    assert loss.item() == pytest.approx(-0.106 + 0.1 * 0.1931471805599453)


def _policy_case(seed=0, B=4, T=6, V=5):
    g = torch.Generator().manual_seed(seed)
    logits_BTV = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens_BT = torch.randint(0, V, (B, T), generator=g)
    mask_BT = torch.ones(B, T, dtype=torch.float64)
    mask_BT[0, 4:] = 0  # different lengths
    mask_BT[2, 2:] = 0
    mask_BT[3, 0] = 0  # a masked prompt token
    adv_B = torch.tensor([0.7, -1.2, 0.3, 0.2], dtype=torch.float64)
    return logits_BTV, tokens_BT, mask_BT, adv_B


@pytest.mark.parametrize("norm", NORMS)
def test_on_policy_gradient_is_reinforce_with_group_baseline(norm):
    logits_BTV, tokens_BT, mask_BT, adv_B = _policy_case()
    logits_BTV.requires_grad_(True)
    logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, tokens_BT[..., None])[..., 0]
    loss, stats = R.grpo_loss(logp_BT, logp_BT.detach(), adv_B, mask_BT, norm=norm, max_len=10)
    loss.backward()
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    # independent: d log softmax(z)[tok] / dz = onehot(tok) - softmax(z); loss = -sum A logp / Z
    B, T, V = logits_BTV.shape
    if norm == "seq":
        Z_BT = mask_BT.sum(1, keepdim=True).expand(B, T) * B
    elif norm == "token":
        Z_BT = torch.full((B, T), mask_BT.sum().item(), dtype=torch.float64)
    else:
        Z_BT = torch.full((B, T), float(B * 10), dtype=torch.float64)
    probs_BTV = torch.softmax(logits_BTV.detach(), -1)
    onehot_BTV = torch.nn.functional.one_hot(tokens_BT, V).double()
    coef_BT = adv_B[:, None] * mask_BT / Z_BT
    want_BTV = -coef_BT[..., None] * (onehot_BTV - probs_BTV)
    torch.testing.assert_close(logits_BTV.grad, want_BTV, rtol=1e-12, atol=1e-12)


def test_clipped_side_has_zero_gradient():
    # ratios: 1.5 (above 1 + 0.28), 0.5 (below 1 - 0.2), 1.1 (inside)
    ratio_T = torch.tensor([1.5, 0.5, 1.1], dtype=torch.float64)
    for a, zero in ((1.0, [True, False, False]), (-1.0, [False, True, False])):
        logp_BT = ratio_T.log()[None].clone().requires_grad_(True)
        old_BT = torch.zeros(1, 3, dtype=torch.float64)
        adv_B = torch.tensor([a], dtype=torch.float64)
        loss, _ = R.grpo_loss(logp_BT, old_BT, adv_B, torch.ones(1, 3), norm="token")
        loss.backward()
        g_T = logp_BT.grad[0]
        # unclipped tokens: d(-ratio A / 3)/dlogp = -ratio A / 3
        for t in range(3):
            want = 0.0 if zero[t] else -ratio_T[t].item() * a / 3
            assert g_T[t].item() == pytest.approx(want, abs=1e-15), (a, t)


def test_grpo_loss_rejects_bad_choices():
    logp, old, adv, mask = _toy_case()
    with pytest.raises(ValueError):
        R.grpo_loss(logp, old, adv, mask, norm="mean")
    with pytest.raises(AssertionError):
        R.grpo_loss(logp, old, adv, mask, norm="const")  # max_len missing
    with pytest.raises(AssertionError):
        R.grpo_loss(logp, old, adv, mask, kl="k3", kl_coef=0.1)  # reference missing


# ----------------------------------------------------------------------------------------------
# KL estimators

def test_kl_estimators_match_formula_and_signs():
    rng = np.random.default_rng(0)
    lq, lp = -rng.random(50) * 5, -rng.random(50) * 5
    for kind, f in (("k1", lambda q, p: q - p), ("k2", lambda q, p: 0.5 * (q - p) ** 2),
                    ("k3", lambda q, p: math.exp(p - q) - 1 - (p - q))):
        got = R.kl_estimate(torch.tensor(lq), torch.tensor(lp), kind)
        want = [f(q, p) for q, p in zip(lq.tolist(), lp.tolist())]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
        if kind != "k1":
            assert torch.all(got >= 0)
    assert torch.all(R.kl_estimate(torch.tensor(lq), torch.tensor(lq), "k3") == 0)


def test_kl_estimators_are_unbiased_or_not_in_value():
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    p = torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64)
    kl_qp = (q * (q / p).log()).sum()
    for kind, unbiased in (("k1", True), ("k3", True), ("k2", False)):
        mean = (q * R.kl_estimate(q.log(), p.log(), kind)).sum().item()
        assert (mean == pytest.approx(kl_qp.item())) == unbiased, kind


def test_kl_gradient_directions_on_3_token_categorical():
    """Exact expectation over x ~ q (enumerate the 3 tokens, weights q(x) held fixed): the
    gradient of k3-as-loss is the FORWARD KL(p || q) gradient, k2's the reverse KL(q || p)'s,
    k1's is zero."""
    theta = torch.tensor([0.3, -1.0, 0.8], dtype=torch.float64, requires_grad=True)
    logp_ref = torch.log(torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64))

    def expected_grad(kind):
        logq = torch.log_softmax(theta, 0)
        weights = logq.exp().detach()  # sampling distribution: no gradient through it
        (g,) = torch.autograd.grad((weights * R.kl_estimate(logq, logp_ref, kind)).sum(), theta)
        return g

    def grad_of(f):
        (g,) = torch.autograd.grad(f(torch.log_softmax(theta, 0)), theta)
        return g

    forward = grad_of(lambda lq: (logp_ref.exp() * (logp_ref - lq)).sum())  # KL(p || q)
    reverse = grad_of(lambda lq: (lq.exp() * (lq - logp_ref)).sum())  # KL(q || p)
    torch.testing.assert_close(expected_grad("k3"), forward, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected_grad("k2"), reverse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(3, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert not torch.allclose(forward, reverse, atol=1e-3)  # the direction is visible here


# ----------------------------------------------------------------------------------------------
# mutual information, rewards

def test_mi_hand_computed_2x1():
    # context 0's sample: p(z|x0) = 0.5, p(z|x1) = 0.25 -> log(0.5 / 0.375) = log(4/3)
    # context 1's sample: p(z|x0) = 0.1, p(z|x1) = 0.4  -> log(0.4 / 0.25)  = log(1.6)
    L = torch.tensor([[[0.5, 0.25]], [[0.1, 0.4]]], dtype=torch.float64).log()  # [N=2, M=1, N=2]
    nats, bits = R.mutual_information(L)
    assert nats == pytest.approx(0.37884285084875824)  # (log(4/3) + log(1.6)) / 2 = log(32/15) / 2
    assert bits == pytest.approx(0.37884285084875824 / math.log(2))
    assert R.bits_per_token(bits, [4, 6]) == pytest.approx(bits / 5)


def test_mi_bounds():
    N, M = 4, 3
    specific = torch.full((N, M, N), -1e4, dtype=torch.float64)
    for i in range(N):
        specific[i, :, i] = -2.0  # only its own context can produce it
    assert R.mutual_information(specific)[0] == pytest.approx(math.log(N))
    assert R.mutual_information(specific)[1] == pytest.approx(2.0)  # log2(4)
    independent = torch.randn(N, M, 1, dtype=torch.float64).expand(N, M, N)
    assert R.mutual_information(independent)[0] == pytest.approx(0.0, abs=1e-12)
    torch.manual_seed(0)
    for _ in range(20):
        L = torch.randn(N, M, N, dtype=torch.float64) * 10
        assert 0.0 <= R.mutual_information(L)[0] <= math.log(N) + 1e-12
        assert torch.all(R.pointwise_mi(L) <= math.log(N) + 1e-12)


def test_mi_negative_mean_is_clipped_to_zero():
    L = torch.tensor([[[0.1, 0.9]], [[0.5, 0.5]]], dtype=torch.float64).log()
    assert R.pointwise_mi(L).mean().item() == pytest.approx(0.5 * math.log(0.1 / 0.5))
    assert R.mutual_information(L) == (0.0, 0.0)


def test_succinctness_and_correctness():
    torch.testing.assert_close(R.succinctness([3, 10]), torch.tensor([3.0, 10.0]))
    torch.testing.assert_close(R.succinctness([3, 10], [30, 0]), torch.tensor([0.1, 10.0]))
    assert R.correctness_reward("  Acme   CORP ", "acme corp") == 1.0
    assert R.correctness_reward("1984", "1985") == 0.0
    assert R.correctness_reward("", "none") == 0.0
