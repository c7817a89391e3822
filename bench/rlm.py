"""Episodes per second of the RLM with sub-calls batched across concurrent episodes vs one
episode at a time, on the tiny preset's worker shape. JSON line last.

    python bench/rlm.py                       # random-init tiny worker, planner root
    python bench/rlm.py --run runs/tiny       # the pretrained tiny models (model root)
    python bench/rlm.py --run runs/tiny-v4    # a directory holding supervisor/ and worker/

The planner root keeps the measurement about the sub-call path (the part the RLM paper calls
its main runtime cost: blocking sequential sub-calls); with `--run` the root is the model too.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import lm  # noqa: E402
import rlm  # noqa: E402
import tasks  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="run directory with pretrain/{supervisor,worker} (or {supervisor,worker})")
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--family", default="count")
    ap.add_argument("--chars", type=int, default=8_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="inference weights (bfloat16 uses the bf16 units of a CPU that has them, or a GPU's)")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.run:
        d = os.path.join(a.run, "pretrain") if os.path.isdir(os.path.join(a.run, "pretrain")) else a.run
        sup, tok = lm.load_model(os.path.join(d, "supervisor"), dtype=a.dtype)
        wrk, _ = lm.load_model(os.path.join(d, "worker"), dtype=a.dtype)
        root = rlm.Endpoint("supervisor", sup, tok, True, 256, window=1024)
    else:
        tok = lm.Tokenizer(enc=lm.train_bpe([t.context for t in tasks.generate_tasks(4, "count", 20_000)], 512))
        wrk = lm.build_model(dataclasses.replace(lm.MODEL_PRESETS["tiny"]["worker"], vocab_size=tok.vocab_size),
                             seed=0).to(getattr(torch, a.dtype))
        root = None
    worker = rlm.Endpoint("worker", wrk, tok, False, 16, window=512)
    group = tasks.generate_tasks(a.episodes, a.family, a.chars, split="eval", seed=1)
    rlm.RLM(root, worker).run_many(group[:2], "rlm-edge", concurrency=2)   # warm-up, untimed
    res = {}
    for name, conc in (("batched", a.concurrency), ("sequential", 1)):
        t0 = time.time()
        trajs = rlm.RLM(root, worker).run_many(group, "rlm-edge", concurrency=conc)
        dt = time.time() - t0
        res[name] = len(trajs) / dt
        res[name + "_score"] = sum(t.score for t in trajs) / len(trajs)   # same work in both modes?
        subcalls = sum(t.ledger()["subcalls"] for t in trajs)
        print(f"{name:>10}: {len(trajs)} episodes, {subcalls} sub-calls in {dt:.1f}s = {res[name]:.2f} episodes/s, "
              f"mean score {res[name + '_score']:.3f}")
    print(json.dumps({"bench": "rlm", "episodes": a.episodes, "chars": a.chars, "family": a.family,
                      "root": "model" if a.run else "planner", "dtype": a.dtype, "batched_eps": round(res["batched"], 3),
                      "sequential_eps": round(res["sequential"], 3), "batched_score": round(res["batched_score"], 4),
                      "sequential_score": round(res["sequential_score"], 4), "ratio": round(res["batched"] / res["sequential"], 2),
                      "target_ratio": 5}))


if __name__ == "__main__":
    main()
