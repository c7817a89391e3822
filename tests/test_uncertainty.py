"""uncertainty.py math against brute-force float64 references written here: pair loops for AUROC,
per-bin loops for ECE, per-ratio recomputation for the deferral curve and s_d, explicit numeric
integration for the KDE overlap, a per-token loop for the Gatekeeper loss."""
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uncertainty as U  # noqa: E402


# ----------------------------------------------------------------------------------------------
# references

def ref_ece(c, y, n_bins):
    n, total = len(c), 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        idx = [i for i in range(n) if lo <= c[i] < hi or (k == n_bins - 1 and c[i] == 1.0)]
        if idx:
            acc = sum(y[i] for i in idx) / len(idx)
            conf = sum(c[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return total


def ref_auroc(c, y):
    pos = [c[i] for i in range(len(c)) if y[i]]
    neg = [c[i] for i in range(len(c)) if not y[i]]
    if not pos or not neg:
        return float("nan")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def ref_curve(c, s, l, ratios):
    n = len(c)
    order = sorted(range(n), key=lambda i: (c[i], i))  # lowest first, ties by index
    accs = []
    for r in ratios:
        k = round(r * n)
        deferred = set(order[:k])
        accs.append(sum(l[i] if i in deferred else s[i] for i in range(n)) / n)
    return accs


def ref_ideal(s, l, ratios):
    """Best accuracy over every subset of size round(r*n): brute force over subsets."""
    n, accs = len(s), []
    for r in ratios:
        k = round(r * n)
        accs.append(max(sum(l[i] if i in sub else s[i] for i in range(n)) / n
                        for sub in map(set, itertools.combinations(range(n), k))))
    return accs


def trap(y, x):
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def ref_sd(c, s, l):
    n = len(c)
    ratios = [i / 100 for i in range(101)]
    acc_s, acc_l = sum(s) / n, sum(l) / n
    rand = [(1 - round(r * n) / n) * acc_s + round(r * n) / n * acc_l for r in ratios]
    real, ideal = ref_curve(c, s, l, ratios), ref_ideal(s, l, ratios)
    num = trap([a - b for a, b in zip(real, rand)], ratios)
    den = trap([a - b for a, b in zip(ideal, rand)], ratios)
    return num / den if den > 1e-12 else float("nan")


def ref_overlap(c, y):
    pos = [c[i] for i in range(len(c)) if y[i]]
    neg = [c[i] for i in range(len(c)) if not y[i]]

    def scott(x):
        return float(np.std(x, ddof=1)) * len(x) ** -0.2

    def kde(x, h, t):
        norm = len(x) * h * math.sqrt(2 * math.pi)
        return sum(math.exp(-0.5 * ((t - xi) / h) ** 2) for xi in x) / norm

    h1, h0 = scott(pos), scott(neg)
    lo, hi, m = min(c) - 10 * max(h1, h0), max(c) + 10 * max(h1, h0), 20000
    dt = (hi - lo) / m
    return sum(min(kde(pos, h1, lo + (j + 0.5) * dt), kde(neg, h0, lo + (j + 0.5) * dt))
               for j in range(m)) * dt  # midpoint rule


def ref_gatekeeper(logits, labels, alpha):
    logits, labels = logits.double(), labels.tolist()
    B, T, V = logits.shape
    right = wrong = 0.0
    n = 0
    for b in range(B):
        for t in range(T):
            if labels[b][t] == -100:
                continue
            n += 1
            z = logits[b, t].tolist()
            mx = max(z)
            lse = mx + math.log(sum(math.exp(v - mx) for v in z))
            logp = [v - lse for v in z]
            if max(range(V), key=lambda v: z[v]) == labels[b][t]:
                right += -logp[labels[b][t]]
            else:
                wrong += sum(math.exp(lp) * lp for lp in logp) + math.log(V)
    return (alpha * right + (1 - alpha) * wrong) / max(n, 1)


def random_case(rng, n):
    c = np.round(rng.random(n), 1)  # one decimal: many ties, and exact 0.0 and 1.0 happen
    c[:2] = [0.0, 1.0]
    s = rng.random(n) < 0.6
    l = rng.random(n) < 0.8
    return c, s, l


# ----------------------------------------------------------------------------------------------
# signals

def test_signals_values_and_confidence_range():
    lp, ent, m = [-0.1, -2.0, -0.5], [0.3, 1.5, 0.6], [0.9, 0.2, 0.5]
    sig = U.signals(torch.tensor(lp), torch.tensor(ent), m)
    assert sig["n_tokens"] == 3
    assert sig["mean_entropy"] == pytest.approx(0.8)
    assert sig["first_entropy"] == pytest.approx(0.3)
    assert sig["mean_logprob"] == pytest.approx(-2.6 / 3)
    assert sig["min_logprob"] == pytest.approx(-2.0)
    assert sig["seq_logprob"] == pytest.approx(-2.6)
    assert sig["mean_top2_margin"] == pytest.approx(1.6 / 3)
    assert U.confidence("mean_logprob", sig) == pytest.approx(math.exp(-2.6 / 3))
    assert U.confidence("mean_entropy", sig) == pytest.approx(math.exp(-0.8))
    for name in ("mean_entropy", "first_entropy", "mean_logprob", "min_logprob", "seq_logprob",
                 "mean_top2_margin"):
        assert 0.0 <= U.confidence(name, sig) <= 1.0


def test_confidence_is_monotone_in_the_right_direction():
    sharp = U.signals([-0.01, -0.02], [0.05, 0.1])
    flat = U.signals([-1.5, -2.5], [2.0, 2.5])
    for name in ("mean_entropy", "first_entropy", "mean_logprob", "min_logprob", "seq_logprob"):
        assert U.confidence(name, sharp) > U.confidence(name, flat), name


def test_signals_empty_sequence():
    sig = U.signals([], [], [])
    assert sig["n_tokens"] == 0
    for name in ("mean_entropy", "first_entropy", "mean_logprob", "min_logprob", "seq_logprob",
                 "mean_top2_margin"):
        assert math.isnan(sig[name])
        assert U.confidence(name, sig) == 0.0


def test_self_consistency():
    assert U.self_consistency(["Paris", " paris ", "PARIS\n", "Lyon"]) == 0.75
    assert U.self_consistency(["Acme  Corp", "acme corp"]) == 1.0
    assert U.self_consistency(["a", "b"]) == 0.5
    assert U.self_consistency([]) == 0.0
    assert U.confidence("self_consistency", {"self_consistency": 0.75}) == 0.75


# ----------------------------------------------------------------------------------------------
# calibration / separation metrics

@pytest.mark.parametrize("seed", range(5))
def test_ece_brier_auroc_match_references(seed):
    rng = np.random.default_rng(seed)
    c, s, _ = random_case(rng, 40)
    for n_bins in (1, 5, 10, 15):
        assert U.expected_calibration_error(c, s, n_bins) == pytest.approx(
            ref_ece(c.tolist(), s.tolist(), n_bins), abs=1e-12)
    assert U.brier_score(c, s) == pytest.approx(np.mean([(a - b) ** 2 for a, b in zip(c, s)]))
    assert U.auroc(c, s) == pytest.approx(ref_auroc(c.tolist(), s.tolist()), abs=1e-12)


def test_ece_bin_edges():
    # 0.7 is the edge between bins 6 and 7 and belongs to bin 7; 1.0 belongs to the last bin
    assert U.expected_calibration_error([0.7, 0.7], [1, 0], 10) == pytest.approx(0.2)
    assert U.expected_calibration_error([1.0, 0.0], [1, 0], 10) == 0.0
    assert U.expected_calibration_error([1.0], [0], 10) == 1.0
    assert math.isnan(U.expected_calibration_error([], [], 10))
    with pytest.raises(ValueError):
        U.expected_calibration_error([1.2], [1])


def test_metric_edge_cases():
    c = [0.0, 0.3, 1.0]
    for y in ([1, 1, 1], [0, 0, 0]):
        assert math.isnan(U.auroc(c, y))
        assert U.expected_calibration_error(c, y) == pytest.approx(ref_ece(c, y, 10))
        assert math.isnan(U.distribution_overlap(c, y))
    assert U.brier_score([1.0, 0.0], [1, 0]) == 0.0
    assert U.brier_score([0.0], [1]) == 1.0
    assert math.isnan(U.auroc([0.5], [1]))
    assert U.auroc([0.0, 1.0], [0, 1]) == 1.0
    assert U.auroc([0.0, 1.0], [1, 0]) == 0.0
    assert U.auroc([0.4, 0.4, 0.4], [1, 0, 1]) == 0.5  # all tied


# ----------------------------------------------------------------------------------------------
# deferral

@pytest.mark.parametrize("seed", range(5))
def test_deferral_curve_matches_reference(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 3, 7, 30):
        c, s, l = random_case(rng, max(n, 2))
        c, s, l = c[:n], s[:n], l[:n]
        ratios, acc = U.deferral_curve(c, s, l)
        assert len(ratios) == 101 and ratios[0] == 0.0 and ratios[-1] == 1.0
        np.testing.assert_allclose(acc, ref_curve(c.tolist(), s.tolist(), l.tolist(), ratios),
                                   atol=1e-12)
        assert acc[0] == pytest.approx(s.mean()) and acc[-1] == pytest.approx(l.mean())


def test_deferral_curve_custom_grid_and_tie_order():
    # all tied: the stable sort defers index 0 first, then 1, ...
    _, acc = U.deferral_curve([0.5] * 4, [0, 1, 1, 1], [1, 0, 0, 0], ratios=[0.25, 0.5])
    np.testing.assert_allclose(acc, [1.0, 0.75])


@pytest.mark.parametrize("seed", range(4))
def test_deferral_performance_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    c, s, l = random_case(rng, 9)
    got = U.deferral_performance(c, s, l)
    want = ref_sd(c.tolist(), s.astype(int).tolist(), l.astype(int).tolist())
    assert got == pytest.approx(want, abs=1e-12) or (math.isnan(got) and math.isnan(want))


def test_deferral_performance_oracle_random_anti():
    rng = np.random.default_rng(0)
    n = 200
    s = (rng.random(n) < 0.6).astype(float)
    l = np.ones(n)  # Gatekeeper's usual picture: the large model is right
    assert U.deferral_performance(s, s, l) == pytest.approx(1.0)  # oracle confidence
    assert U.deferral_performance(1 - s, s, l) < -0.9  # anti-correlated: defers the right ones
    l = (rng.random(n) < 0.8).astype(float)
    assert U.deferral_performance(s - l, s, l) == pytest.approx(1.0)  # full oracle
    assert 0.5 < U.deferral_performance(s, s, l) <= 1.0
    assert U.deferral_performance(1 - s, s, l) < 0
    sds = [U.deferral_performance(rng.random(n), s, l) for _ in range(300)]
    assert abs(np.mean(sds)) < 0.03


def test_deferral_performance_random_is_zero_in_exact_expectation():
    """Average over every ordering of 6 items: E[s_d] = 0 exactly (the denominator does not
    depend on the confidence, and E[acc_real(k)] = acc_rand(k/n))."""
    s, l = [1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1]
    sds = [U.deferral_performance(np.array(p, float), s, l)
           for p in itertools.permutations(range(6))]
    assert abs(np.mean(sds)) < 1e-12


def test_deferral_performance_degenerate_is_nan():
    assert math.isnan(U.deferral_performance([0.1, 0.9, 0.5], [1, 0, 1], [1, 0, 1]))  # S == L
    assert math.isnan(U.deferral_performance([0.3], [0], [1]))  # one item: ideal == random


# ----------------------------------------------------------------------------------------------
# KDE overlap

@pytest.mark.parametrize("seed", range(3))
def test_distribution_overlap_matches_numeric_integration(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(30) < 0.5
    c = np.clip(rng.normal(0.6, 0.15, 30) + 0.15 * y, 0, 1)
    c[:3] = [0.0, 1.0, 1.0]
    got = U.distribution_overlap(c, y, grid=512)
    assert got == pytest.approx(ref_overlap(c.tolist(), y.tolist()), abs=1e-4)
    assert 0.0 <= got <= 1.0 + 1e-9


def test_distribution_overlap_extremes():
    c = np.linspace(0, 1, 20)
    assert U.distribution_overlap(np.r_[c, c], [1] * 20 + [0] * 20) == pytest.approx(1.0, abs=1e-3)
    far = np.r_[np.linspace(0, 0.05, 10), np.linspace(0.95, 1, 10)]
    assert U.distribution_overlap(far, [0] * 10 + [1] * 10) < 1e-3
    # a one-item class, and zero spread everywhere, fall back to a defined bandwidth
    assert 0.0 <= U.distribution_overlap([0.2, 0.5, 0.9], [1, 0, 0]) <= 1.0
    assert U.distribution_overlap([1.0, 1.0], [1, 0]) == pytest.approx(1.0, abs=1e-3)
    assert U.distribution_overlap([0.0, 1.0], [1, 0], bandwidth=0.05) < 1e-6


# ----------------------------------------------------------------------------------------------
# Gatekeeper loss

def _gk_case(seed, B=2, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = logits[0, :2].argmax(-1)  # make sure some tokens are right
    labels[1, -1] = -100
    return logits, labels


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_gatekeeper_loss_matches_loop(alpha):
    for seed in range(3):
        logits, labels = _gk_case(seed)
        want = ref_gatekeeper(logits, labels, alpha)
        assert U.gatekeeper_loss(logits, labels, alpha).item() == pytest.approx(want, abs=1e-12)
        got32 = U.gatekeeper_loss(logits.to(torch.bfloat16), labels, alpha)
        assert got32.dtype == torch.float32  # bf16 logits are upcast


def test_gatekeeper_loss_gradcheck():
    logits, labels = _gk_case(1, B=2, T=3, V=4)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: U.gatekeeper_loss(z, labels, 0.4), (logits,))


def test_gatekeeper_alpha_one_is_ce_on_right_tokens_over_labelled_count():
    logits, labels = _gk_case(2)
    logp = torch.log_softmax(logits, -1)
    mask = labels != -100
    right = (logits.argmax(-1) == labels) & mask
    assert 0 < right.sum() < mask.sum()
    ce = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want = ce[right].sum() / mask.sum()
    assert U.gatekeeper_loss(logits, labels, 1.0).item() == pytest.approx(want.item(), abs=1e-12)


def test_gatekeeper_ignores_minus_100():
    logits, labels = _gk_case(3)
    logits.requires_grad_(True)
    loss = U.gatekeeper_loss(logits, labels, 0.5)
    loss.backward()
    assert torch.all(logits.grad[1, -1] == 0)
    other = logits.detach().clone()
    other[1, -1] = torch.randn(other.shape[-1], dtype=torch.float64) * 5
    assert U.gatekeeper_loss(other, labels, 0.5).item() == pytest.approx(loss.item(), abs=1e-12)
    none = torch.full_like(labels, -100)
    assert U.gatekeeper_loss(logits, none, 0.5).item() == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deferral_table_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, rate = 37, 0.3
    sigs = [U.signals(-rng.random(3), rng.random(3)) for _ in range(n)]
    small = (rng.random(n) < 0.4).astype(float)
    large = (rng.random(n) < 0.7).astype(float)
    table = U.deferral_table(sigs, small, large, ["mean_logprob", "first_entropy"], rate)
    k = int(np.rint(rate * n))
    for name in ("mean_logprob", "first_entropy"):
        conf = [U.confidence(name, d) for d in sigs]
        deferred = sorted(range(n), key=lambda i: (conf[i], i))[:k]   # least confident first, stable
        acc = sum(large[i] if i in deferred else small[i] for i in range(n)) / n
        row = table["signals"][name]
        assert row["accuracy"] == pytest.approx(acc, abs=1e-12)
        assert row["auroc"] == pytest.approx(U.auroc(conf, small))
        gap = large.mean() - small.mean()
        assert row["gap_recovered"] == pytest.approx((acc - small.mean()) / gap)
    rnd = table["signals"]["random"]
    assert rnd["accuracy"] == pytest.approx((1 - k / n) * small.mean() + k / n * large.mean())
    assert table["rate"] == pytest.approx(k / n)


def test_deferral_table_no_gap_is_nan():
    sigs = [U.signals([-0.1], [0.2]) for _ in range(4)]
    same = np.array([1.0, 0.0, 1.0, 0.0])
    table = U.deferral_table(sigs, same, same, ["mean_logprob"], 0.5)
    assert np.isnan(table["signals"]["mean_logprob"]["gap_recovered"])


def test_train_gatekeeper_micro_batches_give_the_same_weights(monkeypatch):
    import distill
    import lm
    # plain SGD: AdamW's first step is lr * sign(g), which turns float noise in near-zero
    # gradients into lr-sized weight differences; SGD compares the gradients themselves
    monkeypatch.setattr(distill, "make_optimizer", lambda model, lr, wd: torch.optim.SGD(model.parameters(), lr=lr))
    cfg = lm.ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 50, (int(n),), generator=g).tolist(), torch.randint(1, 50, (int(m),), generator=g).tolist())
                for n, m in zip(torch.randint(3, 9, (12,), generator=g), torch.randint(1, 6, (12,), generator=g))]
    weights = []
    for mb in (0, 1, 3):
        model = lm.build_model(cfg, seed=0)
        U.train_gatekeeper(model, examples, 0.5, steps=2, batch_size=6, lr=1e-2, seed=0, micro_batch=mb)
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    for w in weights[1:]:
        torch.testing.assert_close(w, weights[0], rtol=1e-5, atol=1e-6)


def test_cascade_hook_escalates_or_abstains_below_tau():
    """The hook re-asks the supervisor for relays below tau; with abstain=True those relays become
    `none` instead, recorded as abstentions, and no model is called."""
    import types as _t

    def out(text, lp):
        return {"text": text, "n_in": 10, "n_out": len(lp), "tokens": list(range(len(lp))), "logprobs": lp,
                "entropies": [0.1] * len(lp)}

    outs = [out("Ada Lovelace", [-2.0, -3.0]), out("none", [-0.01]), out("Bob", [-0.5])]
    tau = math.exp(-1.0)                     # mean_logprob confidence: exp(mean log-prob)
    sup = _t.SimpleNamespace(name="supervisor", cloud=True, tok=_t.SimpleNamespace(chat=lambda m: [1, 2, 3]))

    class Sched:
        def __init__(self):
            self.calls = []

        def call(self, key, ep, ids):
            self.calls.append(len(ids))
            return [out("none", [-0.1]) for _ in ids]

    prompts = ["p0", "p1", "p2"]
    traj = _t.SimpleNamespace(calls=[])
    sched = Sched()
    got = U.cascade_hook("mean_logprob", tau, sup)(prompts, outs, "k", sched, traj)
    assert sched.calls == [1] and [o["text"] for o in got] == ["none", "none", "Bob"]
    assert [c["role"] for c in traj.calls] == ["escalation"] and traj.calls[0]["cloud"]
    traj = _t.SimpleNamespace(calls=[])
    sched = Sched()
    got = U.cascade_hook("mean_logprob", tau, sup, abstain=True)(prompts, outs, "k", sched, traj)
    assert sched.calls == [] and [o["text"] for o in got] == ["none", "none", "Bob"]
    assert got[1] is outs[1] and got[2] is outs[2]
    assert [(c["role"], c["cloud"], c["prompt"], c["n_in"] + c["n_out"]) for c in traj.calls] == \
        [("abstention", False, "p0", 0)]
