"""Data parallelism over several processes with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 2 train.py --stage sft ...      # 2 GPUs (nccl) or 2 CPU processes (gloo)

Every training loop in this project draws its batch from an RNG seeded by (seed, step), so all
ranks know the whole batch without talking. Each rank then takes its share (`shard`), computes the
loss of its rows normalised by the *global* target-token count, and backpropagates; one
`all_reduce` of the flattened gradients (`sync_grads`) then leaves every rank with exactly the
gradient a single process would have computed on the whole batch, so clipping and the optimizer
step stay identical on every rank and the weights never drift apart. That is what
DistributedDataParallel does, minus the bucketing and overlap, written out so it is readable and
so micro-batches of different counts per rank cannot deadlock it.

Sampling is sharded too: each rank rolls out its own prompts with its own seed. Evaluation is not
sharded: every rank runs it (identically) and only rank 0 writes checkpoints, metrics and reports
(the writers in util.py are no-ops elsewhere).

`--fsdp` shards the trained model instead of replicating it (FSDP2, `fully_shard` on every
decoder layer and on the root): parameters, gradients and AdamW states live 1/N on each rank, and
each layer's weights are all-gathered for its forward and backward. FSDP's collectives run inside
forward passes, so every rank must run the same number of them: the training loops pad each rank's
micro-batch count to the global maximum with zero-weight passes (`n_micro`, `zero_pass`), and
no-grad work whose length differs per rank (rollouts, teacher scoring, evaluation) runs inside
`gathered(model)`, which all-gathers the full weights once and keeps them until it exits. Gradients
are summed, not averaged (divide factor 1), like `sync_grads`. Checkpoints gather the full state
dict (`full_state`), so a sharded run saves the same files as an unsharded one.

What it deliberately does not do: no pipeline or tensor parallelism, no overlap of the all-reduce
with the backward pass in the replicated mode, FSDP only where it is wired (pretrain, sft, opd; RL
and the Gatekeeper stay replicated and say so), not with LoRA adapters or an EMA self-teacher
(both refuse with a one-line message), no elastic restarts (a crashed rank ends the run;
rerun the same command and it resumes from the last checkpoint).
"""
import contextlib
import os

import torch
import torch.distributed as td

import util
from util import is_main  # noqa: F401  (rank 0 only writes; re-exported for callers of dist)


def init(device="cpu"):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend)


def world():
    return td.get_world_size() if td.is_initialized() else 1


def rank():
    return td.get_rank() if td.is_initialized() else 0


def device(name):
    """cuda -> this rank's GPU (cuda:LOCAL_RANK); anything else unchanged."""
    if name == "cuda" and world() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def shard(items):
    """This rank's share of a list every rank holds in full (rows rank, rank+W, ...)."""
    return items[rank()::world()]


def all_sum(*values):
    """Sum floats across ranks (one collective for all of them)."""
    if world() == 1:
        return values if len(values) > 1 else values[0]
    t = torch.tensor(values, dtype=torch.float64)
    td.all_reduce(t)
    out = tuple(t.tolist())
    return out if len(out) > 1 else out[0]


def broadcast_params(model):
    """Start every rank from rank 0's weights (they should already agree; this makes sure)."""
    if world() == 1:
        return
    for p in model.parameters():
        if not _is_dtensor(p):      # sharded parameters were built from the same seed everywhere
            td.broadcast(p.data, src=0)


def sync_grads(params):
    """Sum the gradients of `params` across ranks in one flat all_reduce. Losses are normalised by
    the global token count, so the sum is the whole batch's gradient. A rank whose share was empty
    contributes zeros (its .grad is None). FSDP-sharded parameters are skipped: FSDP has already
    reduce-scattered their gradients."""
    params = [p for p in params if p.requires_grad and not _is_dtensor(p)]
    if world() == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    td.all_reduce(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


# ----------------------------------------------------------------------------------------------
# FSDP2: shard the trained model

def _is_dtensor(t):
    return type(t).__name__ == "DTensor"


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_wrap(model):
    """Shard a Hugging Face causal LM over the ranks: each decoder layer, then the root (which
    keeps the embeddings, the final norm and the head)."""
    import types

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    if not td.is_initialized():
        raise util.UserError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)   # sum: the losses are already normalised by global counts
        m.set_force_sum_reduction_for_comms(True)   # plain SUM collectives (gloo has no PREMUL_SUM)
    # lm.hidden_states runs the trunk and applies the head in chunks itself; registering it as a
    # forward method makes FSDP gather the root's weights (embeddings, norm, head) around it
    model.fsdp_hidden = types.MethodType(lambda self, **kw: self.model(**kw).last_hidden_state, model)
    register_fsdp_forward_method(model, "fsdp_hidden")
    return model


@contextlib.contextmanager
def gathered(model):
    """Full weights on every rank for no-grad work whose number of forward passes differs between
    ranks (rollouts, scoring, evaluation). Every rank must enter and leave together. A no-op for
    an unsharded model."""
    mods = fsdp_modules(model) if td.is_initialized() else []
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.set_reshard_after_forward(m is not model)   # FSDP's default: the root stays gathered
            m.reshard()


def n_micro(n, model):
    """The number of micro-batches this rank runs this step: the largest over the ranks when
    `model` is sharded (the extra ones are `zero_pass`es), else its own `n`."""
    if world() == 1 or not td.is_initialized() or not fsdp_modules(model):
        return n
    t = torch.tensor([n], dtype=torch.int64)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())


def zero_pass(model):
    """A forward + backward contributing nothing, so that a rank with fewer micro-batches joins the
    collectives of the others."""
    dev = next(model.parameters()).device
    out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev)).logits
    (out.float().sum() * 0.0).backward()


def local(t):
    """A plain tensor from a (replicated) DTensor, e.g. the gradient norm of a sharded model."""
    return t.full_tensor() if _is_dtensor(t) else t


def full_state(model, opt=None):
    """(model state dict, optimizer state dict) gathered in full on rank 0 (plain state dicts for
    an unsharded model). Every rank must call it."""
    if not fsdp_modules(model):
        return model.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), (get_optimizer_state_dict(model, opt, options=o) if opt is not None else None)


def load_full_state(model, opt, model_sd, opt_sd):
    """Inverse of full_state (every rank passes the same full state dicts)."""
    if not fsdp_modules(model):
        model.load_state_dict(model_sd)
        if opt is not None:
            opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=o)
    if opt is not None:
        set_optimizer_state_dict(model, opt, opt_sd, options=o)


def barrier():
    if world() > 1:
        td.barrier()


def close():
    if td.is_initialized():
        td.destroy_process_group()
