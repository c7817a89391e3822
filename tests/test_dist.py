"""torchrun on CPU (gloo): two ranks must train exactly what one process trains on the same global
batch. Deterministic stages are compared number for number (SFT, Gatekeeper, and OPD with
lmbda 0, whose sequences are the supervisor's greedy relays); the sampling stages (on-policy OPD,
RL) must finish under two ranks with finite numbers and a single writer. `--fsdp` (the worker
sharded with FSDP2) must train SFT and off-policy OPD exactly as one process does too."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _copy(src, dst, stages):
    for s in stages:
        shutil.copytree(os.path.join(src, s), os.path.join(dst, s))


def _run(args, nproc=1):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    r = subprocess.run(launch + [os.path.join(ROOT, "train.py")] + args, env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _steps(path):
    rows = [json.loads(x) for x in open(path)]
    return [r for r in rows if "loss" in r]


def _weights(d):
    return load_file(os.path.join(d, "model.safetensors"))


@pytest.fixture(scope="module")
def two_runs(smoke_run, tmp_path_factory):
    """The same SFT and off-policy OPD, once in one process and once with two ranks."""
    base = tmp_path_factory.mktemp("dist")
    out = {}
    for n in (1, 2, "fsdp"):
        d = str(base / f"n{n}")
        _copy(smoke_run, d, ["pretrain", "collect"])
        common = ["--preset", "smoke", "--out", d, "--quiet", "--threads", "1", "--sft-batch", "6", "--sft-steps", "4"]
        nproc = 2 if n == "fsdp" else n
        common += ["--fsdp"] if n == "fsdp" else []
        _run(common + ["--stage", "sft"], nproc=nproc)
        _run(common + ["--stage", "opd", "--opd-variants", "opd", "--lmbda", "0", "--opd-steps", "3", "--opd-batch", "5"],
             nproc=nproc)
        if n != "fsdp":
            _run(common + ["--stage", "gatekeeper", "--gk-steps", "3", "--gk-alphas", "0.5"], nproc=n)
        out[n] = d
    return out


@pytest.mark.parametrize("n", [2, "fsdp"])
@pytest.mark.parametrize("stage,variant", [("sft", "sft"), ("opd", "opd")])
def test_two_ranks_train_what_one_process_trains(two_runs, stage, variant, n):
    """Replicated (DDP-style) and sharded (FSDP2) training both equal one process."""
    one, two = (_steps(os.path.join(two_runs[k], stage, variant, "metrics.jsonl")) for k in (1, n))
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert math.isfinite(a["loss"]) and a["loss"] != 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), (stage, a, b)
    w1, w2 = (_weights(os.path.join(two_runs[k], stage, variant, "worker")) for k in (1, n))
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_fsdp_on_policy_opd_with_unequal_micro_batches_finishes(two_runs):
    """Each rank samples its own relays, so ranks hold different numbers of sequences: with one
    sequence per micro-batch their forward counts differ, and the sharded student must pad them
    (dist.n_micro / zero_pass) or the collectives would deadlock."""
    d = two_runs["fsdp"]
    _run(["--preset", "smoke", "--out", d, "--quiet", "--threads", "1", "--stage", "opd", "--force", "opd", "--fsdp",
          "--opd-variants", "opd-gated", "--opd-steps", "2", "--micro-batch", "1"], nproc=2)
    rows = [json.loads(x) for x in open(os.path.join(d, "opd", "opd-gated", "metrics.jsonl"))]
    assert rows and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_two_ranks_train_the_same_gatekeeper(two_runs):
    w1, w2 = (_weights(os.path.join(two_runs[n], "gatekeeper", "alpha0.5")) for n in (1, 2))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_only_rank_zero_writes(two_runs):
    d = os.path.join(two_runs[2], "sft", "sft")
    # one writer: every metrics line appears once (two writers would duplicate the steps)
    steps = [json.loads(x)["step"] for x in open(os.path.join(d, "metrics.jsonl")) if "loss" in x]
    assert steps == sorted(set(steps))
    assert not [f for f in os.listdir(d) if f.startswith(".tmp")]


def test_sampling_stages_run_on_two_ranks(smoke_run, two_runs):
    d = two_runs[2]
    _copy(smoke_run, d, ["eval"])
    _run(["--preset", "smoke", "--out", d, "--quiet", "--threads", "1", "--stage", "rl", "--rl-steps", "2",
          "--lams", "0.1"], nproc=2)
    _run(["--preset", "smoke", "--out", d, "--quiet", "--threads", "1", "--stage", "opd", "--force", "opd",
          "--opd-variants", "opd-gated", "--opd-steps", "2"], nproc=2)
    for stage in ("rl", "opd"):
        res = json.load(open(os.path.join(d, stage, "result.json")))
        assert res["seconds"] > 0
    rows = [json.loads(x) for x in open(os.path.join(d, "rl", "rl(lam=0.1)", "metrics.jsonl"))]
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
