"""The recursive language model as an edge-cloud system, its baselines, and the cost ledger.

    python train.py --stage eval                     # every mode x family x length -> report
    python rlm.py --show runs/tiny/eval/trajectories/rlm-edge.jsonl --index 0

The root is the supervisor (cloud). It sees the question and metadata about the context (type,
length, line count), never the context itself; it writes ```repl blocks that run in the sandboxed
REPL (repl.py) where `context` is a variable; `llm_query` / `llm_query_batched` go to the sub-call
model: the worker (edge) in `rlm-edge`, the supervisor itself in `rlm-cloud`. The episode ends when
the code calls FINAL/FINAL_VAR; when `max_iterations` run out the root is asked once for a final
answer. Every call is recorded in a Trajectory (prompt, response, model, token counts, the
sampler's per-token log-probs and entropies, depth); trajectories are the training data of the
distillation stages: the sub-call prompts are exactly what the worker must learn to answer.

Many episodes run at once, one thread each. A thread that calls a model blocks until every live
episode is blocked on a model call too; then all calls to the same model are answered by one
batched `rollout`. Batches are as large as they can be, and their composition does not depend on
thread timing, so greedy evaluation is deterministic.

Modes: `direct` (supervisor reads the context truncated to its window), `worker-direct`,
`rlm-cloud`, `rlm-edge`. `--root planner` replaces the root model by the programmatic planner
(an ablation that separates the worker's contribution from the root's mistakes).

What it deliberately does not do: no compaction of long root histories (the tiny root finishes in
a turn or two; real roots are left-truncated to their window), no asynchronous streaming.
"""
import argparse
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

# Cloud prices in dollars per token (GPT-4o prices the Minions paper used); edge tokens are free
# by default but counted.
PRICE_IN, PRICE_OUT = 2.50e-6, 10.0e-6

SYSTEM_PROMPT = """You answer a question about a long context that you cannot read directly. A Python REPL holds it in the variable `context` (a str). Write Python in ```repl blocks; only what you print comes back to you, truncated. Call `llm_query(prompt)` or `llm_query_batched(prompts)` to ask a small model about pieces of the context (keep each piece a few thousand characters; the small model answers `none` when the piece holds nothing relevant). Aggregate the answers in code, then call FINAL(answer) inside a repl block."""


# ----------------------------------------------------------------------------------------------
# The planner: the kind of program a strong root writes, per task family. It is a data source for
# the tiny root (which learns to write it) and the `--root planner` ablation.

_AGG_ONE = 'hits = [r.strip() for r in rs if r.strip() != "none"]\n'
_NAMES = '{v} = set(n.strip() for r in rs for n in r.split(";") if n.strip() and n.strip() != "none")\n'


def planner_program(task, lines_per_chunk=8):
    q = task.question
    head = (f'L = context.split("\\n")\n'
            f'chunks = ["\\n".join(L[i:i+{lines_per_chunk}]) for i in range(0, len(L), {lines_per_chunk})]\n')

    def ask(subq):
        return f'rs = llm_query_batched([c + "\\nQuestion: {subq}" for c in chunks])\n'
    sq = task.subquestions
    if task.family == "needle":
        return head + ask(sq[0]) + _AGG_ONE + 'FINAL(max(set(hits), key=hits.count) if hits else "none")'
    if task.family == "count":
        return head + ask(sq[0]) + _NAMES.format(v="names") + "FINAL(len(names))"
    if task.family == "multihop":
        second = sq[1].replace(task.meta["org"], '" + org + "') if "org" in task.meta else sq[1]
        return (head + ask(sq[0]) + _AGG_ONE + 'org = max(set(hits), key=hits.count) if hits else "none"\n'
                + ask(second) + _AGG_ONE + 'FINAL(max(set(hits), key=hits.count) if hits else "none")')
    if task.family == "pairs":
        return (head + ask(sq[0]) + _NAMES.format(v="a") + ask(sq[1]) + _NAMES.format(v="b")
                + "import itertools\n"
                + 'ps = sorted(" & ".join(p) for p in itertools.combinations(sorted(a & b), 2))\n'
                + 'FINAL("; ".join(ps) if ps else "none")')
    raise ValueError(f"no planner for family '{task.family}' ({q!r})")


def root_prompt(question, context=None, n_chars=None, n_lines=None):
    """The root's first user turn: the question and the context's metadata, never the context."""
    if context is not None:
        n_chars = len(context)
        n_lines = context.count("\n") + 1 if isinstance(context, str) else len(context)
    kind = type(context).__name__ if context is not None else "str"
    return f"Question: {question}\nThe context is a {kind} of {n_chars} chars in {n_lines} lines."


def root_examples(n, args, rng):
    """(root prompt, ```repl program```) pairs from the planner on training-split tasks. The
    metadata numbers are drawn over the whole length range the root will meet."""
    import tasks
    out = []
    for i in range(n):
        t = tasks.generate_tasks(1, tasks.FAMILIES[i % len(tasks.FAMILIES)], 1_500, split="train",
                                 seed=rng.randrange(1 << 30))[0]
        n_chars = int(10 ** rng.uniform(3, 6))
        prompt = root_prompt(t.question, n_chars=n_chars, n_lines=max(1, n_chars // 45))
        out.append((prompt, "```repl\n" + planner_program(t, args.lines_per_chunk) + "\n```"))
    return out


# ----------------------------------------------------------------------------------------------
# Endpoints and the scheduler that batches calls across episodes.

# seconds that memoised answers (Endpoint.memo) took when first made: run_many adds them back
REPLAYED_S = [0.0]


@dataclass
class Endpoint:
    """One model in one role: how its prompts are formatted, sampled and billed."""
    name: str            # "supervisor" or "worker"
    model: object
    tok: object
    cloud: bool          # billed as cloud tokens
    max_new_tokens: int
    temperature: float = 0.0
    window: int = 1024
    # rows per rollout call: one 311-row relay call took 1.16 s on a 2-core CPU where the same
    # prompts in rows of 32-128 took 0.57-0.64 s (the [rows, heads, P, P] prefill mask and scores
    # outgrow the cache); greedy outputs do not depend on batch mates, so only speed changes
    max_batch: int = 64
    seed: int = None     # sampling seed (temperature > 0); each call uses seed + its call number
    # greedy only: prompt ids -> output, for a frozen model asked the same prompts again (`endpoints`;
    # e.g. every signal and rate of the cascade sweep replays the same root turns and worker relays).
    # Greedy outputs do not depend on batch mates, so answers do not change; only time is saved.
    memo: dict = None

    def generate(self, prompts_ids, seed=None):
        if self.memo is None:
            return self._generate(prompts_ids, seed)
        if self.temperature != 0:
            raise ValueError("Endpoint.memo holds greedy answers only: set temperature=0 or memo=None")
        keys = [tuple(p[-(self.window - self.max_new_tokens):]) for p in prompts_ids]
        todo = list(dict.fromkeys(k for k in keys if k not in self.memo))     # new prompts, each once
        t0 = time.time()
        outs = self._generate([list(k) for k in todo], seed)
        per = (time.time() - t0) / max(1, len(todo))
        for k, o in zip(todo, outs):
            self.memo[k] = (o, per)
        # a replayed answer bills the time it once took, so rows' seconds stay those of a fresh system
        REPLAYED_S[0] += sum(self.memo[k][1] for k in keys) - per * len(todo)
        return [dict(self.memo[k][0]) for k in keys]

    def _generate(self, prompts_ids, seed=None):
        import lm
        out = []
        if seed is None and self.seed is not None:
            self.n_calls = getattr(self, "n_calls", 0) + 1
            seed = self.seed * 100_003 + self.n_calls
        for i in range(0, len(prompts_ids), self.max_batch):
            chunk = [p[-(self.window - self.max_new_tokens):] for p in prompts_ids[i:i + self.max_batch]]
            r = lm.rollout(self.model, chunk, self.max_new_tokens, temperature=self.temperature,
                           eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id,
                           seed=None if seed is None else seed + i)
            for p, t, lp, ent in zip(chunk, r.tokens, r.logprobs, r.entropies):
                out.append({"text": self.tok.decode(t), "n_in": len(p), "n_out": len(t), "tokens": list(t),
                            "logprobs": [round(float(x), 5) for x in lp], "entropies": [round(float(x), 5) for x in ent]})
        return out


class Scheduler:
    """Lock-step batching of model calls from many episode threads (see the module docstring)."""

    def __init__(self):
        self.cv = threading.Condition()
        self.waiting = {}        # key -> slot; one outstanding call per thread
        self.alive = 0

    def call(self, key, endpoint, prompts_ids):
        if not prompts_ids:
            return []
        slot = {"endpoint": endpoint, "prompts": prompts_ids, "result": None}
        with self.cv:
            self.waiting[key] = slot
            self.cv.notify_all()
            while slot["result"] is None:
                self.cv.wait()
        if isinstance(slot["result"], BaseException):
            raise slot["result"]
        return slot["result"]

    def run(self, jobs, concurrency=64):
        """Run `jobs` (callables taking a key) with at most `concurrency` threads; return results."""
        results = [None] * len(jobs)
        queue = list(range(len(jobs)))
        qlock = threading.Lock()

        def worker():
            while True:
                with qlock:
                    if not queue:
                        break
                    j = queue.pop(0)
                try:
                    results[j] = jobs[j](j)
                except BaseException as e:          # an episode bug must not hang the others
                    results[j] = e
            with self.cv:
                self.alive -= 1
                self.cv.notify_all()

        n = min(concurrency, len(jobs))
        self.alive = n
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        while True:
            with self.cv:
                while len(self.waiting) < self.alive:
                    self.cv.wait()
                if self.alive == 0:
                    break
                batch = dict(sorted(self.waiting.items()))
                self.waiting.clear()
            groups = {}
            for key, slot in batch.items():
                groups.setdefault(id(slot["endpoint"]), []).append(slot)
            for slots in groups.values():
                ep = slots[0]["endpoint"]
                flat = [p for s in slots for p in s["prompts"]]
                try:
                    outs = ep.generate(flat)
                except BaseException as e:
                    outs = None
                    for s in slots:
                        s["result"] = e
                if outs is not None:
                    i = 0
                    for s in slots:
                        s["result"], i = outs[i:i + len(s["prompts"])], i + len(s["prompts"])
            with self.cv:
                self.cv.notify_all()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results


# ----------------------------------------------------------------------------------------------
# Trajectories and the ledger

@dataclass
class Trajectory:
    mode: str
    family: str
    question: str
    answer: str
    context_chars: int
    target_chars: int = 0        # the nominal length of the task's group (actual overshoots a little)
    prediction: str = ""
    score: float = 0.0
    reason: str = ""             # final | max_iterations | no_code | budget | error
    calls: list = field(default_factory=list)   # every model call, root and sub
    cells: list = field(default_factory=list)   # every REPL cell: code, stdout, error
    seconds: float = 0.0

    def ledger(self):
        led = {"cloud_in_tokens": 0, "cloud_out_tokens": 0, "edge_in_tokens": 0, "edge_out_tokens": 0,
               "subcalls": 0, "relay_tokens": 0}
        for c in self.calls:
            side = "cloud" if c["cloud"] else "edge"
            led[f"{side}_in_tokens"] += c["n_in"]
            led[f"{side}_out_tokens"] += c["n_out"]
            if c["role"] == "sub":
                led["subcalls"] += 1
                led["relay_tokens"] += c["n_out"]
        led["cost_usd"] = led["cloud_in_tokens"] * PRICE_IN + led["cloud_out_tokens"] * PRICE_OUT
        return led


def save_trajectories(path, trajs):
    import util
    util.write_jsonl(path, [asdict(t) for t in trajs])


def load_trajectories(path):
    import util
    return [Trajectory(**r) for r in util.read_jsonl(path)]


CODE_RE = re.compile(r"```(?:repl|python)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


class RLM:
    """RLM(root, sub, ...) runs episodes; `root` and `sub` are Endpoints (or root=None: planner)."""

    def __init__(self, root, sub, *, max_iterations=3, max_subcalls=256, max_depth=1, timeout_s=30.0,
                 lines_per_chunk=8, chat_system=None, sub_hook=None, sub_transform=None):
        self.root, self.sub = root, sub
        self.max_iterations, self.max_subcalls, self.max_depth = max_iterations, max_subcalls, max_depth
        self.timeout_s, self.lines_per_chunk = timeout_s, lines_per_chunk
        self.system = chat_system
        # sub_hook(prompts, outs, key, sched, traj) may replace some sub-call answers (cascades)
        self.sub_hook = sub_hook
        # sub_transform(prompt) -> the text the sub-call model actually reads (few-shot demos)
        self.sub_transform = sub_transform

    def run(self, task, mode="rlm"):
        return self.run_many([task], mode=mode)[0]

    def run_many(self, tasks_, mode="rlm", concurrency=64):
        sched = Scheduler()
        t0, replayed0 = time.time(), REPLAYED_S[0]
        trajs = sched.run([lambda key, t=t: self._episode(t, key, sched, mode) for t in tasks_], concurrency)
        dt = (time.time() - t0 + REPLAYED_S[0] - replayed0) / max(1, len(tasks_))
        for tr in trajs:
            tr.seconds = round(dt, 4)         # wall time per query, amortised over the batch
        return trajs

    # -- one episode -----------------------------------------------------------------------------
    def _episode(self, task, key, sched, mode):
        import tasks
        traj = Trajectory(mode=mode, family=task.family, question=task.question, answer=task.answer,
                          context_chars=len(task.context), target_chars=task.meta.get("target_chars", 0))
        budget = {"left": self.max_subcalls}           # shared by the episode and all its children
        try:
            traj.prediction, traj.reason = self._run_repl(task, key, sched, traj, 1, budget)
        except Exception as e:             # the episode ends cleanly whatever went wrong
            traj.reason = f"error: {type(e).__name__}: {str(e)[:200]}"
        traj.score = tasks.score(task.family, traj.prediction, task.answer)
        return traj

    def _run_repl(self, task, key, sched, traj, depth, budget):
        import repl as repl_mod
        with repl_mod.REPL(task.context, llm_query_batched=lambda ps: self._subcalls(ps, key, sched, traj, depth, budget),
                           rlm_query=lambda p: self._child(p, key, sched, traj, depth, budget),
                           timeout_s=self.timeout_s, max_subcalls=self.max_subcalls) as r:
            return self._loop(task, key, sched, traj, r)

    def _child(self, prompt, key, sched, traj, depth, budget):
        """rlm_query(prompt): a child RLM whose context is `prompt`, sharing the parent's remaining
        sub-call budget; at the depth cap it is a plain sub-call."""
        import tasks
        if depth >= self.max_depth or self.root is None:
            return self._subcalls([prompt], key, sched, traj, depth, budget)[0]
        if budget["left"] <= 0:
            raise RuntimeError(f"sub-call budget exhausted ({self.max_subcalls} per episode)")
        budget["left"] -= 1
        question = prompt.rpartition("Question: ")[2].strip() or prompt[-200:]
        child = tasks.Task(context=prompt, question=question, answer="", family="custom")
        answer, _ = self._run_repl(child, key, sched, traj, depth + 1, budget)
        return answer

    def _loop(self, task, key, sched, traj, r):
        user = root_prompt(task.question, task.context)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": user}]
        for it in range(self.max_iterations):
            if self.root is None:                        # the planner ablation
                text = "```repl\n" + planner_program(task, self.lines_per_chunk) + "\n```"
            else:
                text = self._root_call(messages, key, sched, traj)
            messages.append({"role": "assistant", "content": text})
            blocks = CODE_RE.findall(text)
            if not blocks:
                return text.strip(), "no_code"
            feedback = []
            for code in blocks:
                res = r.run(code)
                traj.cells.append({"code": code, "stdout": res.stdout, "error": res.error})
                if res.final is not None:
                    return res.final, "final"
                feedback.append(res.stdout + (f"\nError: {res.error}" if res.error else ""))
                if res.error and "budget" in res.error:
                    return "", "budget"
            messages.append({"role": "user", "content": "REPL output:\n" + "\n".join(feedback)[-2000:]})
        if self.root is None:
            return "", "max_iterations"
        messages.append({"role": "user", "content": "No turns left. Reply with the final answer only."})
        return self._root_call(messages, key, sched, traj).strip(), "max_iterations"

    def _root_call(self, messages, key, sched, traj):
        ids = self.root.tok.chat(messages)
        out = sched.call(key, self.root, [ids])[0]
        traj.calls.append(_call_record("root", self.root, messages[-1]["content"], out, 0))
        return out["text"]

    def _subcalls(self, prompts, key, sched, traj, depth, budget):
        if len(prompts) > budget["left"]:
            raise RuntimeError(f"sub-call budget exhausted ({self.max_subcalls} per episode)")
        budget["left"] -= len(prompts)
        shown = [self.sub_transform(p) for p in prompts] if self.sub_transform else prompts
        ids = [self.sub.tok.chat([{"role": "user", "content": p}]) for p in shown]
        outs = sched.call(key, self.sub, ids)
        for p, o in zip(prompts, outs):
            traj.calls.append(_call_record("sub", self.sub, p, o, depth))
        if self.sub_hook is not None:
            outs = self.sub_hook(prompts, outs, key, sched, traj)
        return [o["text"].strip() for o in outs]


def _call_record(role, ep, prompt, out, depth):
    return {"role": role, "model": ep.name, "cloud": ep.cloud, "depth": depth, "prompt": prompt,
            "response": out["text"], "n_in": out["n_in"], "n_out": out["n_out"], "tokens": out["tokens"],
            "logprobs": out["logprobs"], "entropies": out["entropies"]}


# ----------------------------------------------------------------------------------------------
# Direct baselines: the model reads the context truncated to its window.

def run_direct(ep, tasks_, mode):
    import tasks as tasks_mod
    prompts = []
    for t in tasks_:
        q_ids = ep.tok.encode(f"\nQuestion: {t.question}")
        room = ep.window - ep.max_new_tokens - len(q_ids) - 8
        ctx = ep.tok.decode(ep.tok.encode(t.context)[:max(0, room)])
        prompts.append(ep.tok.chat([{"role": "user", "content": f"{ctx}\nQuestion: {t.question}"}]))
    t0 = time.time()
    outs = ep.generate(prompts)
    dt = (time.time() - t0) / max(1, len(tasks_))
    trajs = []
    for t, o in zip(tasks_, outs):
        tr = Trajectory(mode=mode, family=t.family, question=t.question, answer=t.answer, context_chars=len(t.context),
                        target_chars=t.meta.get("target_chars", 0), prediction=o["text"].strip(), reason="direct",
                        seconds=round(dt, 4))
        tr.calls.append(_call_record("direct", ep, "", o, 0))
        tr.score = tasks_mod.score(t.family, tr.prediction, t.answer)
        trajs.append(tr)
    return trajs


def summarize(trajs, method):
    """Per-query means of one (method, family, length) cell in the report schema."""
    n = len(trajs)
    leds = [t.ledger() for t in trajs]
    # the group's nominal length (actual lengths overshoot the target by up to ~100 chars)
    length = trajs[0].target_chars or round(sum(t.context_chars for t in trajs) / n)
    row = {"method": method, "family": trajs[0].family, "context_chars": length, "n": n,
           "accuracy": sum(t.score for t in trajs) / n}
    for k in ("cloud_in_tokens", "cloud_out_tokens", "edge_in_tokens", "edge_out_tokens", "cost_usd", "subcalls", "relay_tokens"):
        row[k] = sum(l[k] for l in leds) / n
    row["seconds"] = sum(t.seconds for t in trajs) / n
    cells = [c for t in trajs for c in t.cells]
    if cells:
        row["code_ok"] = sum(c["error"] is None for c in cells) / len(cells)
    return row


# ----------------------------------------------------------------------------------------------
# The eval stage

def endpoints(args, worker_dir=None):
    """Load the two models (tiny ones from the pretrain stage unless --worker/--supervisor name others)."""
    import lm
    pre = os.path.join(args.out, "pretrain")
    sup_m, sup_t = lm.load_model(args.supervisor or os.path.join(pre, "supervisor"), args.device, args.dtype)
    wrk_m, wrk_t = lm.load_model(worker_dir or args.worker or os.path.join(pre, "worker"), args.device, args.dtype)
    win = lambda m: getattr(m.config, "max_position_embeddings", 1024)
    eps = {"root": Endpoint("supervisor", sup_m, sup_t, True, args.root_tokens, window=min(win(sup_m), args.max_window)),
           "sup_sub": Endpoint("supervisor", sup_m, sup_t, True, args.relay_tokens, window=min(win(sup_m), args.max_window)),
           "worker_sub": Endpoint("worker", wrk_m, wrk_t, False, args.relay_tokens, window=min(win(wrk_m), args.max_window)),
           "sup_direct": Endpoint("supervisor", sup_m, sup_t, True, args.answer_tokens, window=min(win(sup_m), args.max_window)),
           "worker_direct": Endpoint("worker", wrk_m, wrk_t, False, args.answer_tokens, window=min(win(wrk_m), args.max_window))}
    # these models stay frozen while the endpoints live, so greedy answers can be replayed: the root's
    # first turn is the same for every mode, every worker variant and every point of a cascade sweep
    for ep in eps.values():
        ep.memo = {}
    return eps


def eval_tasks(args, split="eval"):
    """The held-out tasks of every family at the two context lengths (cached by seed)."""
    import tasks
    return [tagged(tasks.generate_tasks(args.eval_n, fam, length, split=split, seed=args.seed + 7), length)
            for length in (args.short_chars, args.long_chars) for fam in args.families]


def tagged(group, length):
    for t in group:
        t.meta["target_chars"] = length
    return group


def make_rlm(args, eps, sub="worker_sub", sub_hook=None, sub_transform=None):
    # real chat models get the RLM system prompt; the tiny root learnt its role without one
    system = SYSTEM_PROMPT if eps["root"].tok.hf is not None else None
    return RLM(None if args.root == "planner" else eps["root"], eps[sub], max_iterations=args.max_iterations,
               max_subcalls=args.max_subcalls, max_depth=args.max_depth, timeout_s=args.repl_timeout,
               lines_per_chunk=args.lines_per_chunk,
               chat_system=system, sub_hook=sub_hook, sub_transform=sub_transform)


def evaluate(args, eps, method, groups, traj_dir=None):
    """Run one method on every (family, length) group -> report rows (and trajectories on disk)."""
    rows, all_trajs = [], []
    for group in groups:
        if method == "direct":
            trajs = run_direct(eps["sup_direct"], group, method)
        elif method == "worker-direct":
            trajs = run_direct(eps["worker_direct"], group, method)
        elif method == "rlm-cloud":
            trajs = make_rlm(args, eps, "sup_sub").run_many(group, method, args.concurrency)
        else:
            trajs = make_rlm(args, eps, "worker_sub").run_many(group, method, args.concurrency)
        rows.append(summarize(trajs, method))
        all_trajs += trajs
    if traj_dir:
        save_trajectories(os.path.join(traj_dir, f"{method}.jsonl"), all_trajs)
    return rows, all_trajs


def stage_eval(args):
    import util
    d = os.path.join(args.out, "eval")
    eps = endpoints(args)
    groups = eval_tasks(args)
    rows = []
    methods = ["direct", "worker-direct", "rlm-cloud", "rlm-edge"]
    prog = util.Progress("eval", len(methods), unit="method", quiet=args.quiet)
    for i, m in enumerate(methods):
        r, _ = evaluate(args, eps, m, groups, traj_dir=os.path.join(d, "trajectories"))
        rows += r
        prog.update(i + 1)
    prog.close()
    return {"rows": rows}


_SUP_CACHE = {}


def endpoints_with_worker(args, model, tok):
    """The eval endpoints with the sub-call worker swapped for `model` (supervisor loaded once)."""
    key = (args.out, args.supervisor)
    if key not in _SUP_CACHE:
        _SUP_CACHE.clear()
        _SUP_CACHE[key] = endpoints(args)
    eps = dict(_SUP_CACHE[key])
    win = min(getattr(model.config, "max_position_embeddings", 1024), args.max_window)
    eps["worker_sub"] = Endpoint("worker", model, tok, False, args.relay_tokens, window=win)
    return eps


def worker_accuracy(args, model, tok, groups, sub_transform=None):
    """Mean end-to-end rlm-edge score with this worker on task groups (learning-curve points)."""
    eps = endpoints_with_worker(args, model, tok)
    trajs = [t for g in groups for t in make_rlm(args, eps, sub_transform=sub_transform).run_many(g, "rlm-edge", args.concurrency)]
    return sum(t.score for t in trajs) / max(1, len(trajs))


def eval_worker(args, model, tok, method, traj_dir=None, sub_transform=None, extra=None):
    """The report rows of `rlm-edge` with this worker on the held-out eval tasks."""
    eps = endpoints_with_worker(args, model, tok)
    rows, trajs = [], []
    for group in eval_tasks(args):
        tr = make_rlm(args, eps, sub_transform=sub_transform).run_many(group, method, args.concurrency)
        rows.append({**summarize(tr, method), **(extra or {})})
        trajs += tr
    if traj_dir:
        save_trajectories(os.path.join(traj_dir, f"{method}.jsonl"), trajs)
    return rows


def dev_tasks(args, n=None):
    """A few held-out tasks per family at the long length, disjoint from the report's eval tasks
    (another seed), for learning curves."""
    import tasks
    return [tagged(tasks.generate_tasks(n or args.curve_n, fam, args.long_chars, split="eval", seed=args.seed + 99),
                   args.long_chars) for fam in args.families]


def stage_collect(args):
    """Training-split episodes of rlm-cloud (the supervisor's relays: SFT targets, few-shot demos,
    off-policy data) and rlm-edge (the worker's own sub-call prompts and outcomes)."""
    import tasks
    d = os.path.join(args.out, "collect")
    eps = endpoints(args)
    out = {}
    args = argparse.Namespace(**{**vars(args), "root": args.collect_root})
    for method, sub in (("rlm-cloud", "sup_sub"), ("rlm-edge", "worker_sub")):
        trajs = []
        for fam in args.families:
            for length in (args.short_chars, args.long_chars // 2):
                group = tasks.generate_tasks(args.collect_n, fam, length, split="train", seed=args.seed + 1)
                trajs += make_rlm(args, eps, sub).run_many(group, method, args.concurrency)
        save_trajectories(os.path.join(d, f"{method}.jsonl"), trajs)
        out[method] = {"episodes": len(trajs), "accuracy": sum(t.score for t in trajs) / len(trajs),
                       "subcalls": sum(t.ledger()["subcalls"] for t in trajs)}
        print(f"[collect] {method}: {out[method]}")
    return {"collect": out}


def add_args(p):
    g = p.add_argument_group("rlm (eval and every stage that runs episodes)")
    g.add_argument("--root", default="model", help="model | planner (ablation: the planner writes the root code)")
    g.add_argument("--max-iterations", type=int, default=3)
    g.add_argument("--max-subcalls", type=int, default=256, help="sub-calls per episode (children included)")
    g.add_argument("--max-depth", type=int, default=1, help="1 = rlm_query is a plain sub-call; 2+ = child RLMs")
    g.add_argument("--repl-timeout", type=float, default=30.0, help="seconds per REPL cell")
    g.add_argument("--concurrency", type=int, default=64, help="episodes in flight at once")
    g.add_argument("--root-tokens", type=int, default=None, help="max new tokens per root turn")
    g.add_argument("--relay-tokens", type=int, default=None, help="max new tokens per sub-call relay")
    g.add_argument("--answer-tokens", type=int, default=32, help="max new tokens of a direct answer")
    g.add_argument("--max-window", type=int, default=32768, help="cap on a model's window")
    g.add_argument("--collect-n", type=int, default=None, help="training tasks per family and length to collect")
    g.add_argument("--collect-root", default=None, help="model | planner: the root of the collect stage's episodes "
                                                      "(smoke uses the planner: its root is too small to write code)")
    g.add_argument("--curve-n", type=int, default=None, help="dev tasks per family for end-to-end curve points")


# ----------------------------------------------------------------------------------------------
# The trajectory viewer

def show(path, index):
    trajs = load_trajectories(path)
    if not 0 <= index < len(trajs):
        raise SystemExit(f"error: {path} has {len(trajs)} trajectories; --index must be in 0..{len(trajs) - 1}")
    t = trajs[index]
    bar = "-" * 78
    print(f"{t.mode}  family={t.family}  context={t.context_chars} chars  score={t.score:.2f}  reason={t.reason}")
    print(f"Q: {t.question}\ngold: {t.answer}\npred: {t.prediction}")
    print("ledger:", json.dumps(t.ledger()))
    cells = iter(t.cells)
    for c in t.calls:
        if c["role"] in ("root", "direct"):
            print(bar + f"\n[{c['role']} · {c['model']} · in {c['n_in']} out {c['n_out']} tokens]\n{c['response']}")
            if c["role"] == "root":
                cell = next(cells, None)
                if cell:
                    print(f"[REPL] stdout: {cell['stdout'][:500]!r}  error: {cell['error']}")
        else:
            prompt = c["prompt"].rsplit("\nQuestion: ", 1)
            print(f"  [sub · {c['model']}] Q: {prompt[-1][:80]} -> {c['response']!r}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print one RLM trajectory readably")
    ap.add_argument("--show", required=True, metavar="FILE.jsonl")
    ap.add_argument("--index", type=int, default=0)
    a = ap.parse_args()
    show(a.show, a.index)
