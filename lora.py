"""Handwritten LoRA for every linear layer of a transformers model (attention and MLP).

    model = lora.apply(model, rank=8, alpha=32)   # base frozen, A/B trainable
    ...train...
    lora.merge(model)                             # fold B @ A into the base weights, remove wrappers

W' = W + (alpha / r) * B @ A with A random and B zero, so training starts exactly at the base
model. Per "LoRA Without Regret": all linear layers including the MLP, and a learning rate about
10x the full-fine-tuning one (the stages scale `--lr` by `--lora-lr-mult` when `--lora-rank > 0`).
The embedding and the LM head stay frozen.

What it deliberately does not do: no dropout on the adapter, no per-module ranks, no saving of
adapters on their own (checkpoints are merged, so they load with plain transformers).
"""
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        w = base.weight
        self.A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))   # the same init nn.Linear uses

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def apply(model, rank, alpha=32.0, skip=("lm_head",)):
    """Wrap every nn.Linear except `skip`; freeze everything but the adapters. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not any(name.endswith(s) for s in skip)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(mod, rank, alpha))
    return model


@torch.no_grad()
def merge(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back."""
    wrapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    for name, mod in wrapped:
        mod.base.weight += (mod.B @ mod.A) * mod.scale
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]
