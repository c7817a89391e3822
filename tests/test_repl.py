"""Functional tests of repl.py: python -m pytest -q tests/test_repl.py"""
import os
import time

import pytest

from repl import REPL


class FakeModel:
    """A parent-side model that echoes prompts and counts how often it was called."""
    def __init__(self):
        self.single_calls, self.batch_calls, self.prompts = 0, 0, []

    def query(self, prompt):
        self.single_calls += 1
        self.prompts.append(prompt)
        return f"answer to {prompt}"

    def batched(self, prompts):
        self.batch_calls += 1
        self.prompts.extend(prompts)
        return [f"answer to {p}" for p in prompts]


@pytest.fixture(scope="module")
def repl():
    with REPL("the quick brown fox", timeout_s=5) as r:
        yield r


def test_persistence_across_cells(repl):
    assert repl.run("counter = 41\ndef bump(n):\n    return n + 1").error is None
    r = repl.run("counter = bump(counter)\nprint(counter)")
    assert (r.stdout, r.error) == ("42\n", None)


def test_stdout_truncation_marker():
    with REPL("", stdout_chars=100) as r:
        res = r.run("print('a' * 1000)")  # 1001 chars with the newline
    assert res.stdout.startswith("a" * 100)
    assert res.stdout.endswith("... [truncated 901 chars]")
    assert res.error is None


def test_error_has_type_message_and_line(repl):
    r = repl.run("x = 1\ny = 2\nz = undefined_name + x")
    assert r.error.startswith("NameError: name 'undefined_name' is not defined")
    assert "line 3: z = undefined_name + x" in r.error


def test_error_inside_function_reports_cell_line(repl):
    r = repl.run("def f(d):\n    return d['missing']\n\nf({})")
    assert r.error.startswith("KeyError: 'missing'")
    assert "line 2: return d['missing']" in r.error


def test_syntax_error_line(repl):
    r = repl.run("a = 1\nb = (2 +\n")
    assert r.error.startswith("SyntaxError") and "line 2" in r.error


def test_stdout_kept_when_cell_fails(repl):
    r = repl.run("print('before')\n1 / 0")
    assert r.stdout == "before\n" and r.error.startswith("ZeroDivisionError")


def test_final(repl):
    r = repl.run("FINAL(6 * 7)")
    assert (r.final, r.error) == ("42", None)
    assert repl.run("x = 1").final is None  # final belongs to the cell that set it


def test_final_var(repl):
    r = repl.run("answer = ['a', 'b']\nFINAL_VAR('answer')")
    assert r.final == "['a', 'b']"


def test_final_var_missing_is_an_error(repl):
    r = repl.run("FINAL_VAR('no_such_variable')")
    assert r.final is None
    assert "NameError" in r.error and "no_such_variable" in r.error


def test_llm_query_with_fake_model():
    model = FakeModel()
    with REPL("ctx", llm_query=model.query) as r:
        res = r.run("reply = llm_query('hello ' + context)\nprint(reply)")
    assert res.stdout == "answer to hello ctx\n"
    assert res.subcalls == 1 and model.single_calls == 1


def test_llm_query_batched_is_one_parent_call():
    model = FakeModel()
    with REPL("ctx", llm_query=model.query, llm_query_batched=model.batched) as r:
        res = r.run("out = llm_query_batched([f'q{i}' for i in range(10)])\nprint(out[3])")
    assert res.stdout == "answer to q3\n"
    assert model.batch_calls == 1 and model.single_calls == 0
    assert res.subcalls == 10


def test_single_derived_from_batched():
    model = FakeModel()
    with REPL("", llm_query_batched=model.batched) as r:
        res = r.run("print(llm_query('x'))")
    assert res.stdout == "answer to x\n" and model.batch_calls == 1


def test_batched_derived_from_single():
    model = FakeModel()
    with REPL("", llm_query=model.query) as r:
        res = r.run("print(llm_query_batched(['a', 'b']))")
    assert res.stdout == "['answer to a', 'answer to b']\n" and model.single_calls == 2


def test_no_parent_model_raises_inside_cell(repl):
    r = repl.run("try:\n    llm_query('x')\nexcept RuntimeError as e:\n    print('caught', e)")
    assert r.stdout.startswith("caught llm_query is not available")


def test_rlm_query_plumbing():
    with REPL("", llm_query=lambda p: "llm", rlm_query=lambda p: f"rlm:{p}") as r:
        assert r.run("print(rlm_query('q'), llm_query('q'))").stdout == "rlm:q llm\n"
    with REPL("", llm_query=lambda p: "llm") as r:  # depth 1: rlm_query falls back to llm_query
        assert r.run("print(rlm_query('q'))").stdout == "llm\n"


def test_budget_exhaustion_raises_inside_cell_and_next_cell_works():
    model = FakeModel()
    with REPL("", llm_query=model.query, max_subcalls=3) as r:
        res = r.run("for i in range(5):\n    print(llm_query(str(i)))")
        assert res.error.startswith("RuntimeError: sub-call budget exhausted")
        assert res.stdout.count("answer to") == 3 and res.subcalls == 3
        res = r.run("try:\n    llm_query('again')\nexcept RuntimeError:\n    print('denied')\ny = 5")
        assert (res.stdout, res.error) == ("denied\n", None)
        assert r.run("print(y + 1)").stdout == "6\n"  # state survived the exhausted budget
        assert model.single_calls == 3 and r.subcalls_used == 3


def test_batch_past_budget_is_refused_whole():
    model = FakeModel()
    with REPL("", llm_query_batched=model.batched, max_subcalls=5) as r:
        res = r.run("llm_query_batched(['a'] * 6)")
    assert "budget" in res.error and model.batch_calls == 0


def test_parent_exception_becomes_child_exception():
    def broken(prompt):
        raise ValueError("backend down")
    with REPL("", llm_query=broken) as r:
        res = r.run("try:\n    llm_query('x')\nexcept RuntimeError as e:\n    print(e)")
        assert "ValueError: backend down" in res.stdout
        assert r.run("print('still alive')").stdout == "still alive\n"


def test_parent_model_time_does_not_count_against_timeout():
    def slow(prompt):
        time.sleep(0.6)
        return "slow answer"
    with REPL("", llm_query=slow, timeout_s=1.0) as r:
        res = r.run("print([llm_query('x') for _ in range(3)])")
    assert res.error is None and res.stdout.count("slow answer") == 3


@pytest.mark.parametrize("context, cell, expected", [
    ("some text", "print(context.upper(), len(context))", "SOME TEXT 9\n"),
    (["doc one", "doc two"], "print(len(context), context[1])", "2 doc two\n"),
    ({"title": "T", "chunks": ["a", "b"]}, "print(context['title'], context['chunks'])", "T ['a', 'b']\n"),
], ids=["str", "list", "dict"])
def test_context_types(context, cell, expected):
    with REPL(context) as r:
        assert r.run(cell).stdout == expected


def test_context_restored_after_reassignment(repl):
    repl.run("context = None")
    assert repl.run("print(context)").stdout == "the quick brown fox\n"


def test_allowed_imports_work(repl):
    r = repl.run("import json, re, math, collections, itertools, functools, statistics, string\n"
                 "import random, heapq, bisect, datetime, textwrap, difflib, operator, copy\n"
                 "import fractions, decimal, typing, dataclasses\n"
                 "from collections import Counter\n"
                 "print(Counter('abca').most_common(1), json.dumps({'k': [1]}), math.isqrt(17))\n"
                 "print(datetime.datetime.strptime('2024-05-01', '%Y-%m-%d').year)\n"
                 "from math import *\nprint(floor(pi))")
    assert (r.stdout, r.error) == ("[('a', 2)] {\"k\": [1]} 4\n2024\n3\n", None)


def test_classes_dataclasses_and_format(repl):
    r = repl.run("import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int\n"
                 "    def __str__(self):\n        return f'P<{self.x}>'\n"
                 "template = 'Q: {q} / {p}'\nprint(template.format(q='hi', p=P(3)), '{}!'.format(1))")
    assert (r.stdout, r.error) == ("Q: hi / P<3> 1!\n", None)
    r = repl.run("print('{obj}:{method}'.format(obj=1, method=2), '{a[k]}'.format_map({'a': {'k': 3}}))")
    assert (r.stdout, r.error) == ("1:2 3\n", None)  # keyword names of the rewritten call are free


def test_timeout_restarts_child_and_loses_state():
    with REPL("", timeout_s=1.0) as r:
        r.run("kept = 1")
        old_pid = r.pid
        t0 = time.monotonic()
        res = r.run("while True:\n    pass")
        assert time.monotonic() - t0 < 2.0
        assert res.error.startswith("TimeoutError") and "variables were lost" in res.error
        assert r.pid != old_pid and r.restarts == 1
        assert "NameError" in r.run("print(kept)").error
        assert r.run("print('fresh')").stdout == "fresh\n"


def test_child_killed_from_outside_is_reported_and_restarted():
    with REPL("") as r:
        os.kill(r.pid, 9)
        time.sleep(0.1)
        res = r.run("print(1)")
        assert "died" in res.error and "SIGKILL" in res.error
        assert r.run("print(2)").stdout == "2\n"


def test_result_records_seconds_and_subcalls(repl):
    r = repl.run("x = sum(range(1000))")
    assert r.subcalls == 0 and 0 < r.seconds < 1


def test_close_cleans_temp_dir_and_child():
    r = REPL("x")
    tmpdir, pid = r.tmpdir, r.pid
    assert os.path.isdir(tmpdir)
    os.kill(pid, 0)  # alive
    r.close()
    assert not os.path.exists(tmpdir)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError):
        r.run("x = 1")
    r.close()  # idempotent


def test_context_manager_closes():
    with REPL("x") as r:
        tmpdir = r.tmpdir
    assert not os.path.exists(tmpdir) and r.pid is None


# --- the fork server: children are forked from one helper process per parent ---

def test_forked_child_holds_only_its_pipes():
    """The child must not inherit the fork server's socket (or anything else): only its pipes."""
    with REPL("x") as r:
        targets = [os.readlink(f"/proc/{r.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{r.pid}/fd")]
        assert len(targets) == 5, targets  # /dev/null as 0 and 1, stderr, the two protocol dups
        assert not any(t.startswith("socket:") for t in targets), targets


def test_forked_children_do_not_share_random_state():
    """Children are seeded by their context: different episodes draw differently, a rerun of one
    episode draws the same (runs of one seed repeat)."""
    cell = "import random\nprint(random.random())"
    with REPL("one") as a, REPL("two") as b:
        assert a.run(cell).stdout != b.run(cell).stdout
        assert a.run(cell).stdout != a.run(cell).stdout        # the stream advances within an episode
    with REPL("one") as c:
        first = c.run(cell).stdout
    with REPL("one") as d:
        assert d.run(cell).stdout == first


def test_fork_server_restarts_after_it_is_killed():
    import repl as repl_mod
    with REPL("") as r:
        r.run("x = 1")
    old = repl_mod._fork_server()
    old.proc.kill()
    old.proc.wait()
    with REPL("") as r:  # a fresh server, and the new child works
        assert r.run("print(2)").stdout == "2\n"
    assert repl_mod._fork_server() is not old


def test_children_started_from_many_threads():
    import threading
    outs = [None] * 12

    def go(i):
        with REPL(str(i)) as r:
            outs[i] = (r.pid, r.run("print(context)").stdout)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(outs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o[1] for o in outs] == [f"{i}\n" for i in range(len(outs))]
    assert len({o[0] for o in outs}) == len(outs)


def test_fork_server_and_children_die_with_the_parent(tmp_path):
    """A parent killed with SIGKILL leaves nothing behind: the server sees its socket close."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import os, sys, repl\nr = repl.REPL('x')\n"
            "print(repl._fork_server().proc.pid, r.pid, flush=True)\nos.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr

    def gone(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] in "ZX"  # a zombie waiting for init counts
        except FileNotFoundError:
            return True
    deadline = time.monotonic() + 5
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids)


def test_set_order_and_random_repeat_across_runs():
    """Regression: each process's fork server had a random string-hash seed and children reseeded
    `random` from fresh entropy, so a root iterating a set of names (or drawing random numbers)
    asked its sub-calls in another order in every run. Two separate processes must agree."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prog = ("from repl import REPL\n"
            "with REPL('x', llm_query=lambda p: p) as r:\n"
            "    print(r.run(\"import random\\nprint(list({'Ada', 'Bob', 'Cy', 'Dee', 'Eve', 'Fay'}), random.random())\").stdout)\n"
            "    print(r.run('import tasks').error is not None)\n")   # project modules stay out of reach
    outs = [subprocess.run([sys.executable, "-c", prog], cwd=here, capture_output=True, text=True, timeout=60).stdout
            for _ in range(2)]
    assert outs[0] == outs[1] and "Ada" in outs[0] and outs[0].rstrip().endswith("True")
