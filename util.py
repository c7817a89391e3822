"""Run-directory plumbing shared by every stage: atomic writes, JSONL metrics, a progress line,
the learning-rate schedule, seeding, and the one-line user error.

Nothing here knows about models or tasks. It deliberately does not log to any service: metrics go
to `metrics.jsonl` files that the report and the figures read back.
"""
import json
import math
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch


class UserError(Exception):
    """Bad input from the user: train.py prints the message on one line and exits 2, no traceback."""


def is_main():
    """True on rank 0 of a torchrun job (and always in a single process). Only rank 0 writes: every
    writer below is a no-op elsewhere, so stage code needs no rank checks (see dist.py)."""
    import torch.distributed as td
    return not td.is_initialized() or td.get_rank() == 0


def remove(path):
    """Delete a file if it exists (rank 0 only, like every write)."""
    if is_main() and os.path.exists(path):
        os.remove(path)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Atomic writes: write a temporary file in the same directory, then rename over the target, so a
# crash or Ctrl-C never leaves a half-written report or checkpoint behind.

def atomic_write_text(path, text):
    if not is_main():
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def atomic_torch_save(obj, path):
    if not is_main():
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Metrics:
    """Append-only JSONL metrics. One line per call; flushed so a killed run keeps its curve."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path

    def log(self, **row):
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step):
        """On resume, drop lines written after the checkpoint we resumed from (they will be redone)."""
        if not is_main() or not os.path.exists(self.path):
            return
        rows = [r for r in read_jsonl(self.path) if r.get("step", -1) <= step]
        write_jsonl(self.path, rows)


# ----------------------------------------------------------------------------------------------

class Progress:
    """One self-overwriting terminal line: `stage  step/total  rate  ETA  extra`."""

    def __init__(self, stage, total, unit="step", quiet=False):
        self.stage, self.total, self.unit, self.quiet = stage, max(1, total), unit, quiet or not is_main()
        self.t0 = time.time()
        self.start = 0
        self.last_print = 0.0

    def update(self, done, **extra):
        now = time.time()
        # a terminal gets a line rewritten twice a second; a log file gets a line every 10 s
        every = 0.5 if sys.stderr.isatty() else 10.0
        if self.quiet or (now - self.last_print < every and done < self.total):
            return
        self.last_print = now
        el = now - self.t0
        rate = (done - self.start) / el if el > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        ex = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
        line = f"\r[{self.stage}] {done}/{self.total} {self.unit}s  {rate:.2f} {self.unit}/s  ETA {fmt_s(eta)}  {ex}"
        sys.stderr.write(line[:160].ljust(100) if sys.stderr.isatty() else line[1:161] + "\n")
        sys.stderr.flush()

    def close(self):
        if not self.quiet:
            sys.stderr.write(f"  done in {fmt_s(time.time() - self.t0)}\n")
            sys.stderr.flush()


def fmt_s(s):
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def cosine_lr(step, total, peak, warmup):
    """Linear warmup to `peak`, cosine decay to 10% of peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
