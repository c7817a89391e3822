"""Muon for the hidden weight matrices, AdamW for everything else: the optimizer the tiny models
are pretrained from scratch with.

Why it is here: a tiny model learns to relay (find the line that names the question's entity,
copy the value after it) only after a long plateau, the plateau in which induction heads form.
With AdamW the 0.7M worker crosses it after ~1,300-2,000 steps of 16 dialogues; with Muon, at the
same batch and data, after ~500 (docs/LOG.md). On a 2-core CPU that is the difference between an
hour of pretraining and a quarter of one.

Muon keeps a momentum buffer per matrix, as SGD does, but replaces each update by the nearest
semi-orthogonal matrix (every singular value ~1), found by a few steps of a quintic Newton-Schulz
iteration. Updates then move every direction of a weight matrix by about the same amount, instead
of mostly the few directions that already carry a large gradient; small, rare signals (the
content match of an induction head) grow at the same rate as the common ones.

    opt = Muon([{"params": hidden_matrices, "muon": True, "lr": 0.02},
                {"params": embeddings_and_norms, "muon": False, "lr": 3e-3, "weight_decay": 0.1}])
    python -m pytest -q tests/test_muon.py

Does not: shard (a DTensor shard is not the matrix; `--fsdp` pretrains with AdamW), run the
iteration in bfloat16 (these matrices are small), or apply weight decay to the Muon matrices (the
runs in docs/LOG.md had none). Fine-tuning stages keep plain AdamW: Muon is for training from scratch.
"""
import math

import torch

# quintic coefficients that push singular values in (0, 1] towards ~1 fast (a sharp, not exact, fit)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G_MN, steps=5):
    """Approximately U V^T for G = U S V^T: singular values land in roughly [0.7, 1.2]."""
    a, b, c = NS_COEFFS
    X = G_MN / (G_MN.norm() + 1e-7)   # Frobenius norm >= spectral norm: every singular value <= 1
    wide = X.shape[0] <= X.shape[1]
    if not wide:
        X = X.T                       # iterate on the smaller Gram matrix
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.T


class Muon(torch.optim.Optimizer):
    """Param groups with `muon: True` (2-D matrices only) take Muon steps: nesterov momentum,
    orthogonalised, scaled by sqrt(max(1, rows / cols)) so a tall matrix's columns move as far as
    a wide one's rows. The other groups take AdamW steps (decoupled weight decay, bias correction)."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, muon=False)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["muon"] and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("Muon: a `muon` group may hold 2-D weight matrices only; put vectors and "
                                 "embeddings in an AdamW group (muon=False)")

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if g["muon"]:
                    buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(g["momentum"]).add_(p.grad)
                    update = p.grad.add(buf, alpha=g["momentum"])   # nesterov
                    update = orthogonalize(update, g["ns_steps"]) * math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                    p.add_(update, alpha=-g["lr"])
                    continue
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                b1, b2 = g["betas"]
                st["step"] += 1
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.mul_(1 - g["lr"] * g["weight_decay"])
                denom = (st["exp_avg_sq"] / (1 - b2 ** st["step"])).sqrt_().add_(g["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / (1 - b1 ** st["step"]))


def for_model(model, lr, muon_lr, weight_decay):
    """Muon on the transformer blocks' matrices; AdamW (lr, weight decay) on the embedding and the
    output head (tied or not: they are lookups, not linear maps between hidden states), AdamW without
    decay on norms and biases. `lr_mult` lets one schedule drive both learning rates."""
    io = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        io.add(id(model.get_output_embeddings().weight))
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.dim() == 2 and id(p) not in io]
    emb = [p for p in params if p.dim() >= 2 and id(p) in io]
    rest = [p for p in params if p.dim() < 2]
    return Muon([{"params": hidden, "muon": True, "lr": muon_lr, "lr_mult": muon_lr / lr},
                 {"params": emb, "lr": lr, "weight_decay": weight_decay},
                 {"params": rest, "lr": lr, "weight_decay": 0.0}])
