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

What it deliberately does not do: no sharding of a model too large for one GPU (FSDP2 would need
every rank to run the same number of forward passes, which rollouts of different lengths, gates
and length-sorted micro-batches break; not written yet), no pipeline or tensor parallelism, no
overlap of the all-reduce with the backward pass, no elastic restarts (a crashed rank ends the
run; rerun the same command and it resumes from the last checkpoint).
"""
import os

import torch
import torch.distributed as td

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
        td.broadcast(p.data, src=0)


def sync_grads(params):
    """Sum the gradients of `params` across ranks in one flat all_reduce. Losses are normalised by
    the global token count, so the sum is the whole batch's gradient. A rank whose share was empty
    contributes zeros (its .grad is None)."""
    params = [p for p in params if p.requires_grad]
    if world() == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    td.all_reduce(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.grad = flat[i:i + n].view_as(p).clone()
        i += n


def barrier():
    if world() > 1:
        td.barrier()


def close():
    if td.is_initialized():
        td.destroy_process_group()
