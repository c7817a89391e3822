"""The GPU training benchmark's script runs end to end on the CPU (tiny shape) and ends with a
JSON line of positive rates; bench/gpu.sh runs the same script on Qwen3 shapes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_bench_prints_a_json_line_last():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--threads", "1", "--steps", "1",
                        "--batch", "2", "--samples", "2", "--prompt", "16", "--new", "4", "--grad-ckpt"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("opd_rollout_tok_s", "opd_train_tok_s", "opd_teacher_tok_s", "rl_rollout_tok_s", "rl_train_tok_s"):
        assert last[key] > 0, key
    assert last["params"] > 0 and last["grad_ckpt"] is True
