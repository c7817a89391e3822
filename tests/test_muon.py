"""muon.py against float64 references: the Newton-Schulz iteration, Muon's step, the AdamW groups
(torch's AdamW), parameter grouping on a real model, and resuming from a state dict."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import lm
import muon


def _ns_reference(G, steps=5):
    """The quintic iteration in float64 numpy, written from its definition."""
    a, b, c = muon.NS_COEFFS
    X = G / (np.linalg.norm(G) + 1e-7)
    T = X.shape[0] > X.shape[1]
    X = X.T if T else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if T else X


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (48, 12), (1, 7), (7, 1)])
def test_orthogonalize_matches_float64_and_flattens_the_spectrum(shape):
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(*shape, generator=g)
    O = muon.orthogonalize(G)
    np.testing.assert_allclose(O.double().numpy(), _ns_reference(G.double().numpy()), rtol=1e-4, atol=1e-5)
    # in G's own singular basis the result is diagonal with every singular value near 1
    U, S, Vh = np.linalg.svd(G.double().numpy(), full_matrices=False)
    D = U.T @ O.double().numpy() @ Vh.T
    assert np.abs(D - np.diag(np.diag(D))).max() < 1e-4
    assert np.diag(D).min() > 0.5 and np.diag(D).max() < 1.3, np.diag(D)


def test_orthogonalize_of_zero_is_zero():
    assert torch.count_nonzero(muon.orthogonalize(torch.zeros(4, 6))) == 0


def test_muon_steps_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 5, generator=g)
    grads = [torch.randn(12, 5, generator=g) for _ in range(4)]
    p = torch.nn.Parameter(W.clone())
    opt = muon.Muon([{"params": [p], "muon": True}], lr=0.05, momentum=0.9)
    w, buf = W.double().numpy().copy(), np.zeros((12, 5))
    for G in grads:
        p.grad = G.clone()
        opt.step()
        Gd = G.double().numpy()
        buf = 0.9 * buf + Gd
        w = w - 0.05 * _ns_reference(Gd + 0.9 * buf) * np.sqrt(12 / 5)
    np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=1e-4, atol=1e-5)


def test_adamw_groups_equal_torch_adamw():
    g = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(6, 4, generator=g))
    v = torch.nn.Parameter(torch.randn(4, generator=g))
    b, u = copy.deepcopy(a), copy.deepcopy(v)
    ours = muon.Muon([{"params": [a], "weight_decay": 0.1}, {"params": [v], "weight_decay": 0.0}], lr=3e-3)
    ref = torch.optim.AdamW([{"params": [b], "weight_decay": 0.1}, {"params": [u], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(6):
        ga, gv = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
        a.grad, b.grad, v.grad, u.grad = ga.clone(), ga.clone(), gv.clone(), gv.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, u, rtol=1e-6, atol=1e-7)


def test_a_vector_in_a_muon_group_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        muon.Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}])


@pytest.mark.parametrize("tie", [True, False])
def test_for_model_puts_each_parameter_in_one_group(tie):
    cfg = dataclasses.replace(lm.MODEL_PRESETS["smoke"]["worker"], vocab_size=64, tie_embeddings=tie)
    model = lm.build_model(cfg, seed=0)
    opt = muon.for_model(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())      # every parameter exactly once
    hidden, emb, rest = opt.param_groups
    assert hidden["muon"] and hidden["lr_mult"] == pytest.approx(0.02 / 3e-3)
    io = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert {id(p) for p in emb["params"]} == io and emb["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in rest["params"]) and rest["weight_decay"] == 0.0


def test_resuming_from_a_state_dict_continues_exactly():
    cfg = dataclasses.replace(lm.MODEL_PRESETS["smoke"]["worker"], vocab_size=64)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))

    def steps(model, opt, n):
        for _ in range(n):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    m1 = lm.build_model(cfg, seed=0)
    o1 = muon.for_model(m1, 3e-3, 0.02, 0.1)
    steps(m1, o1, 2)
    m2 = copy.deepcopy(m1)
    o2 = muon.for_model(m2, 3e-3, 0.02, 0.1)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))   # as if read back from disk
    steps(m1, o1, 2)
    steps(m2, o2, 2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
