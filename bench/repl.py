"""REPL overhead: a trivial cell, and one llm_query round trip with an instant fake model.

Run:
    python bench/repl.py
    python bench/repl.py --iters 1000

Times are wall clock in the parent around REPL.run(), so a cell includes both pipe hops, the AST
check, compile and exec. The llm_query round trip is the median of a cell doing one
`llm_query('x')` minus the median of the trivial cell `x = 1` (the raw cell is reported too).
Every measurement is warmed up untimed. Human lines first, a JSON line last.

Child start-up: a REPL child forked from the fork server (repl.py), side by side with the cost it
replaced, a fresh interpreter importing the same modules (a lower bound: the old child also
hardened itself after that), as a ratio. The first REPL of a process also starts the server.

Not covered: large contexts (sent once at start-up), real models, cells that do real work.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from repl import ALLOWED_MODULES, REPL  # noqa: E402  (the repo root, not this file, which is also called repl.py)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--iters", type=int, default=200, help="timed runs per measurement")
parser.add_argument("--warmup", type=int, default=20, help="untimed runs first")
parser.add_argument("--starts", type=int, default=10, help="child start-ups to time")
args = parser.parse_args()
print(json.dumps(vars(args)))


def median_ms(repl, code):
    for _ in range(args.warmup):
        assert repl.run(code).error is None
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        repl.run(code)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def fresh_interpreter_s():
    """The baseline a fork replaces: a new interpreter that imports the sandbox's modules."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-c", "import " + ", ".join(ALLOWED_MODULES)], check=True)
    return time.perf_counter() - t0


t0 = time.perf_counter()
REPL("").close()  # the first REPL of a process also starts the fork server
first_ms = 1e3 * (time.perf_counter() - t0)
starts, fresh = [], []
for _ in range(args.starts):
    t0 = time.perf_counter()
    REPL("").close()
    starts.append(time.perf_counter() - t0)
    fresh.append(fresh_interpreter_s())
start_ms, fresh_ms = 1e3 * statistics.median(starts), 1e3 * statistics.median(fresh)

with REPL("some context " * 1000, llm_query=lambda prompt: "answer") as repl:
    cell_ms = median_ms(repl, "x = 1")
    llm_cell_ms = median_ms(repl, "y = llm_query('x')")
    batch_ms = median_ms(repl, "ys = llm_query_batched(['x'] * 20)")
    netns = repl.netns
llm_ms = max(llm_cell_ms - cell_ms, 0.0)

print(f"first REPL (+ fork server):    {first_ms:7.2f} ms")
print(f"child start-up + close:        {start_ms:7.2f} ms (median of {args.starts}; a fresh interpreter "
      f"importing the same modules: {fresh_ms:.2f} ms, {fresh_ms / start_ms:.1f}x)")
print(f"trivial cell `x = 1`:          {cell_ms:7.3f} ms (target < 5 ms)")
print(f"cell with one llm_query:       {llm_cell_ms:7.3f} ms")
print(f"llm_query round trip:          {llm_ms:7.3f} ms (target < 2 ms)")
print(f"cell with a batch of 20:       {batch_ms:7.3f} ms (one round trip)")
print(f"network namespace: {netns}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
print(json.dumps({"bench": "repl", "cell_ms_median": round(cell_ms, 4),
                  "llm_query_ms_median": round(llm_ms, 4),
                  "llm_query_cell_ms_median": round(llm_cell_ms, 4),
                  "batch20_cell_ms_median": round(batch_ms, 4),
                  "startup_ms_median": round(start_ms, 2), "fresh_interpreter_ms_median": round(fresh_ms, 2),
                  "startup_speedup": round(fresh_ms / start_ms, 2), "first_repl_ms": round(first_ms, 2),
                  "target_cell_ms": 5,
                  "target_llm_query_ms": 2, "iters": args.iters, "netns": netns}))
