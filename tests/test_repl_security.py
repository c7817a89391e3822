"""Adversarial cells against repl.py: python -m pytest -q tests/test_repl_security.py

Before the REPL starts, the test process plants a secret file in its cwd and a secret env var.
Every case then checks that the parent lives, that no secret reaches stdout/error/final, that
`run` returns within timeout_s + 1 s, that the cell is denied (result.error set) where it
should be, and that the next cell `x = 1; print('ok')` still works.
"""
import os
import time
import types
import uuid

import pytest

import repl as repl_module
from repl import REPL

TIMEOUT_S = 2.0
PARENT_PID = os.getpid()
ENV_NAME = "REPL_TEST_SECRET"
ENV_SECRET = "env-secret-" + uuid.uuid4().hex
FILE_SECRET = "file-secret-" + uuid.uuid4().hex
WRITE_PATH = f"/tmp/repl-pwned-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def secret_path(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("parent_cwd")
    path = cwd / "secret.txt"
    path.write_text(FILE_SECRET)
    old_cwd = os.getcwd()
    os.environ[ENV_NAME] = ENV_SECRET
    os.chdir(cwd)
    yield str(path)
    os.chdir(old_cwd)
    del os.environ[ENV_NAME]


@pytest.fixture(scope="module")
def repl(secret_path):
    with REPL("public context", llm_query=lambda p: "fine", timeout_s=TIMEOUT_S, memory_mb=256,
              max_subcalls=10**6) as r:
        yield r


def attack(repl, code, secret_path, denied=True):
    code = (code.replace("{SECRET_PATH}", secret_path).replace("{PARENT_PID}", str(PARENT_PID))
            .replace("{DOTDOT_PATH}", "../" * 12 + secret_path.lstrip("/"))
            .replace("{WRITE_PATH}", WRITE_PATH).replace("{ENV_NAME}", ENV_NAME))
    t0 = time.monotonic()
    r = repl.run(code)
    assert time.monotonic() - t0 < repl.timeout_s + 1
    os.kill(PARENT_PID, 0)  # the parent lives (and so does this test)
    shown = r.stdout + (r.error or "") + (r.final or "")
    assert ENV_SECRET not in shown and FILE_SECRET not in shown
    if denied:
        assert r.error, f"not denied: {r}"
    assert not os.path.exists(WRITE_PATH)
    after = repl.run("x = 1; print('ok')")
    assert (after.stdout, after.error) == ("ok\n", None)
    return r


CASES = {
    # imports and __import__ tricks
    "import_os": "import os\nprint(os.environ)",
    "import_posix": "import posix\nprint(posix.environ)",
    "import_sys_modules": "import sys\nprint(sys.modules['os'].environ)",
    "import_subprocess": "import subprocess\nprint(subprocess.check_output(['env']))",
    "import_pty": "import pty\npty.spawn('/bin/sh')",
    "import_ctypes": "import ctypes\nctypes.CDLL(None).system(b'env')",
    "import_builtins": "import builtins\nprint(builtins.open('{SECRET_PATH}').read())",
    "importlib": "import importlib\nprint(importlib.import_module('os').environ)",
    "dunder_import": "__import__('os').system('env')",
    "builtins_dict_import": "__builtins__['__import__']('os')",
    "relative_import": "from . import repl",
    "submodule_attribute": "import json\nprint(json.decoder.scanstring)",
    "private_module_attribute": "import random\nprint(random._os.environ)",
    "proxy_internals": "import json\nprint(json._attrs)",
    "proxy_is_read_only": "import json\njson.dumps = print",
    # attribute walks to globals, builtins and subclasses
    "subclasses_walk": "for c in ().__class__.__base__.__subclasses__():\n"
                       "    if c.__name__ == '_wrap_close':\n"
                       "        print(c.__init__.__globals__['environ'])",
    "object_subclasses": "print(object.__subclasses__())",
    "function_globals": "def f():\n    pass\nprint(f.__globals__['__builtins__'])",
    "llm_query_globals": "print(llm_query.__globals__['os'].environ)",
    "builtins_name": "print(__builtins__)",
    "match_class_attribute": "match llm_query:\n    case object(__globals__=g):\n"
                             "        print(g['os'].environ)",
    "getattr_string": "print(getattr(llm_query, '__glob' + 'als__'))",
    "vars_globals_dir": "print(vars(), globals(), locals(), dir())",
    "operator_attrgetter": "import operator\n"
                           "print(operator.attrgetter('__globals__')(llm_query)['os'].environ)",
    "format_attribute": "print('{0.__globals__[os].environ}'.format(llm_query))",
    "format_variable_template": "t = '{0.__glob' + 'als__}'\nprint(t.format(llm_query))",
    "format_map_attribute": "print('{x.__globals__}'.format_map({'x': llm_query}))",
    "bare_format_method": "f = '{0.__globals__}'.format\nprint(f(llm_query))",
    "str_format_unbound": "print(str.format('{0.__globals__}', llm_query))",
    "string_formatter": "import string\n"
                        "print(string.Formatter().get_field('0.__globals__', [llm_query], {}))",
    "string_annotation_eval": "import typing\ndef f(x: 'llm_query.__globals__'):\n    pass\n"
                              "print(typing.get_type_hints(f))",
    "get_type_hints_removed": "import typing\nprint(typing.get_type_hints)",
    "singledispatch_removed": "import functools\nprint(functools.singledispatch)",
    "update_wrapper_getattr": "import functools\nbox = []\nclass S:\n"
                              "    def __setattr__(self, k, v):\n        box.append(v)\n"
                              "functools.update_wrapper(S(), llm_query, assigned=('__globals__',),"
                              " updated=())\nprint(box[0]['os'].environ)",
    "private_attribute": "class A:\n    pass\na = A()\na._secret = 1",
    "future_import": "from __future__ import annotations",
    # frame escapes
    "sys_getframe": "import sys\nprint(sys._getframe(1).f_globals['os'].environ)",
    "generator_frame": "def g():\n    yield 1\nit = g()\nnext(it)\n"
                       "print(it.gi_frame.f_back.f_globals['os'].environ)",
    "coroutine_frame": "async def c():\n    pass\nco = c()\nprint(co.cr_frame.f_globals)",
    "traceback_frame": "try:\n    1 / 0\nexcept Exception as e:\n"
                       "    print(e.__traceback__.tb_frame.f_back.f_globals['os'].environ)",
    # files
    "open_absolute": "print(open('{SECRET_PATH}').read())",
    "open_dotdot": "print(open('{DOTDOT_PATH}').read())",
    "open_parent_cwd_relative": "print(open('secret.txt').read())",
    "proc_self_environ": "print(open('/proc/self/environ').read())",
    "proc_parent_environ": "print(open('/proc/{PARENT_PID}/environ').read())",
    "io_open": "import io\nprint(io.open('{SECRET_PATH}').read())",
    "pathlib_read": "import pathlib\nprint(pathlib.Path('{SECRET_PATH}').read_text())",
    "linecache_read": "import linecache\nprint(linecache.getline('{SECRET_PATH}', 1))",
    "write_file": "open('{WRITE_PATH}', 'w').write('pwned')",
    "print_to_file": "print('pwned', file=open('{WRITE_PATH}', 'w'))",
    # environment, network, processes
    "os_environ": "import os\nprint(os.environ['{ENV_NAME}'])",
    "os_getenv": "from os import getenv\nprint(getenv('{ENV_NAME}'))",
    "socket_connect": "import socket\nsocket.create_connection(('127.0.0.1', 22))",
    "private_socket": "import _socket",
    "urllib": "import urllib.request\nurllib.request.urlopen('http://example.com')",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "threading": "import threading\nthreading.Thread(target=print).start()",
    # resources
    "memory_bomb_string": "x = 'x' * 10**10",
    "memory_bomb_bytearray": "b = bytearray(10**10)",
    "memory_bomb_list": "def grow():\n    a = []\n    while True:\n        a.append(' ' * 10**6)\n"
                        "grow()",
    "cpu_loop": "while True:\n    pass",
    "cpu_bigint_in_c": "x = 10 ** (10 ** 8)",
    "regex_backtracking": "import re\nre.match('(a*)*b', 'a' * 40)",
    "time_sleep": "import time\ntime.sleep(100)",
    "deep_recursion": "def f(n):\n    return f(n + 1)\nf(0)",
    "deep_repr": "a = []\nfor _ in range(10**5):\n    a = [a]\nprint(a)",
    "c_stack_overflow_segfault": "x = iter([1])\nfor _ in range(10**5):\n    x = map(abs, x)\n"
                                 "print(next(x))",
    "parser_bomb": "x = " + "+".join(["1"] * 100_000),
    "nested_parentheses": "x = " + "(" * 1000 + ")" * 1000,
    # signals, limits, the parent
    "signal_handler": "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)",
    "setrlimit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "kill_parent": "import os\nos.kill({PARENT_PID}, 9)",
    "kill_parent_via_signal": "import signal\nsignal.pthread_kill({PARENT_PID}, 9)",
    "system_exit": "raise SystemExit(0)",
    "exit_builtin": "exit()",
    "keyboard_interrupt": "raise KeyboardInterrupt",
    # code objects and serialisation
    "pickle": "import pickle\npickle.loads(b\"cos\\nsystem\\n(S'env'\\ntR.\")",
    "marshal": "import marshal\nmarshal.loads(b'')",
    "code_object_type": "def f():\n    pass\nCode = type(f.__code__)",
    "function_type_constructor": "F = type(lambda: 0)\nF(None, {})",
    "types_module": "import types\nprint(types.CodeType)",
    "type_three_args": "T = type('T', (), {'x': 1})",
    "exec": "exec('import os')",
    "eval": "eval(\"__import__('os')\")",
    "compile": "compile('1', 'x', 'eval')",
    # exceptions
    "huge_exception_message": "raise ValueError('x' * 10**7)",
    "exception_str_raises": "class E(Exception):\n    def __str__(self):\n"
                            "        raise RuntimeError('no')\nraise E()",
    "exception_str_loops": "class E(Exception):\n    def __str__(self):\n        while True:\n"
                           "            pass\nraise E()",
}


@pytest.mark.parametrize("code", list(CASES.values()), ids=list(CASES))
def test_denied(repl, secret_path, code):
    attack(repl, code, secret_path)


def test_huge_exception_message_is_truncated(repl, secret_path):
    r = attack(repl, "raise ValueError('x' * 10**7)", secret_path)
    assert r.error.startswith("ValueError: xxx") and len(r.error) < 2_500
    assert "truncated" in r.error


def test_giant_print_is_capped(repl, secret_path):
    r = attack(repl, "print('x' * 10**8)", secret_path, denied=False)
    assert r.error is None and len(r.stdout) < repl.stdout_chars + 100
    assert r.stdout.endswith(f"... [truncated {10**8 + 1 - repl.stdout_chars} chars]")


def test_print_flood_is_capped(repl, secret_path):
    r = attack(repl, "for i in range(10**5):\n    print('y' * 99)", secret_path, denied=False)
    assert r.error is None and f"[truncated {10**7 - repl.stdout_chars} chars]" in r.stdout


def test_mutating_reserved_names_does_not_break_later_cells(repl, secret_path):
    attack(repl, "print = None\nFINAL = None\nFINAL_VAR = None\nllm_query = None\n"
                 "llm_query_batched = None\ncontext = None", secret_path, denied=False)
    r = repl.run("print(context, llm_query('q'), llm_query_batched(['q']))\nFINAL('done')")
    assert (r.stdout, r.error, r.final) == ("public context fine ['fine']\n", None, "done")
    attack(repl, "del print, FINAL, llm_query", secret_path, denied=False)


def test_segfault_is_reported_and_the_child_restarted(repl, secret_path):
    """Nested map() overflows the C stack in CPython 3.11: the child dies, the parent does not."""
    restarts = repl.restarts
    r = attack(repl, "x = iter([1])\nfor _ in range(10**5):\n    x = map(abs, x)\nnext(x)",
               secret_path)
    if "died" in r.error:
        assert "SIGSEGV" in r.error and "lost" in r.error and repl.restarts == restarts + 1
    else:  # newer CPythons guard the C stack
        assert r.error.startswith("RecursionError")


def test_timeout_loses_state_but_not_the_repl(repl, secret_path):
    repl.run("survivor = 1")
    r = attack(repl, "while True:\n    pass", secret_path)
    assert r.error.startswith("TimeoutError") and "lost" in r.error
    assert "NameError" in repl.run("print(survivor)").error


def test_llm_query_flood_past_budget(secret_path):
    calls = []
    with REPL("", llm_query=lambda p: calls.append(p) or "a", timeout_s=TIMEOUT_S,
              max_subcalls=5) as r:
        res = attack(r, "for i in range(10**6):\n    llm_query('flood')", secret_path)
        assert "budget exhausted" in res.error and res.subcalls == 5 and len(calls) == 5
        res = attack(r, "llm_query_batched(['flood'] * 10**5)", secret_path)
        assert "budget exhausted" in res.error and len(calls) == 5
        # a flood that swallows the budget error spins until the wall clock stops it
        res = attack(r, "while True:\n    try:\n        llm_query('x')\n"
                        "    except RuntimeError:\n        pass", secret_path)
        assert res.error.startswith("TimeoutError") and len(calls) == 5


def test_child_process_is_confined(repl, secret_path):
    """Inspect the child from the parent: uid, rlimits, environment, cwd, network namespace."""
    pid = repl.pid
    with open(f"/proc/{pid}/limits") as f:
        limits = f.read()
    assert "Max file size             0" in limits
    assert "Max processes             0" in limits
    assert "Max core file size        0" in limits
    soft = {line[:26].strip(): line[26:47].strip() for line in limits.splitlines()[1:]}
    assert int(soft["Max open files"]) <= 8  # only the fds it already holds
    assert int(soft["Max address space"]) <= (repl.memory_mb + 128) << 20
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().decode()
    assert ENV_SECRET not in environ and ENV_NAME not in environ
    assert os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(repl.tmpdir)
    assert os.listdir(repl.tmpdir) == []
    assert os.getpgid(pid) == pid != os.getpgid(0)  # its own process group and session
    if os.geteuid() == 0:
        with open(f"/proc/{pid}/status") as f:
            assert "Uid:\t65534\t65534\t65534\t65534" in f.read()
    if repl.netns:
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # typing.io, typing.re
def test_module_proxies_expose_no_modules_or_escape_hatches():
    """Allowed modules must not hand out os/sys (or any module) through public attributes."""
    import importlib
    for name in repl_module.ALLOWED_MODULES:
        proxy = repl_module.ModuleProxy(importlib.import_module(name))
        for key in dir(importlib.import_module(name)):
            if key.startswith("_"):
                continue
            stripped = key in repl_module.STRIPPED.get(name, ())
            try:
                value = getattr(proxy, key)
            except AttributeError:
                assert stripped or isinstance(getattr(importlib.import_module(name), key),
                                              types.ModuleType)
                continue
            assert not stripped and not isinstance(value, types.ModuleType), (name, key)
            for sub in dir(value):  # one level further: classes and functions
                if not sub.startswith("_") and sub not in repl_module.FRAME_ATTRS:
                    assert not isinstance(getattr(value, sub, None), types.ModuleType), (name, key, sub)


def test_str_subclass_tricks(repl, secret_path):
    """A str subclass must not smuggle attribute reads through str.format or break print."""
    attack(repl, "class S(str):\n    pass\nprint(S.format('{0.__globals__}', llm_query))",
           secret_path)
    r = attack(repl, "class S(str):\n    def __len__(self):\n        raise RuntimeError('len')\n"
                     "    def __getitem__(self, i):\n        return 42\n"
                     "class T:\n    def __str__(self):\n        return S('tricky')\n"
                     "print(T(), S('also'))", secret_path, denied=False)
    assert (r.stdout, r.error) == ("tricky also\n", None)


def test_del_hook_between_cells_cannot_desync_the_protocol(repl, secret_path):
    """A __del__ that fires while the child restores reserved names runs outside any cell; its
    llm_query must fail there instead of writing a request the parent does not expect."""
    attack(repl, "class D:\n    def __del__(self):\n        llm_query('from __del__')\n"
                 "llm_query = D()", secret_path, denied=False)
    r = attack(repl, "print(llm_query('q'))", secret_path, denied=False)
    assert r.stdout == "fine\n"
    assert b"can only be called while a cell runs" in repl._err_tail  # the hook did fire


def test_patching_json_classes_does_not_break_the_protocol(secret_path):
    """The child's wire format must not go through classes a cell can import and patch."""
    with REPL("", timeout_s=TIMEOUT_S) as r:
        attack(r, "import json\njson.JSONEncoder.item_separator = 'X'\n"
                  "json.JSONEncoder.encode = None\njson.JSONEncoder.iterencode = None\n"
                  "json.JSONDecoder.decode = None\njson.JSONDecoder.raw_decode = None",
               secret_path, denied=False)
        assert r.restarts == 0


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(8, "big") + body


@pytest.mark.parametrize("payload", [
    (2**60).to_bytes(8, "big"),                                   # absurd length
    _frame(b"{not json"),
    _frame(b"[1, 2, 3]"),                                         # not an object
    _frame(b"[" * 30_000 + b"]" * 30_000),                        # nesting bomb (< pipe size)
    _frame(b'{"op": "llm", "kind": "llm", "prompts": "not a list"}'),
    _frame(b'{"op": "llm", "kind": "os.system", "prompts": ["x"]}'),
    _frame(b'{"op": "done", "stdout": 42, "error": null, "final": null}'),
    _frame(b'{"op": "unknown"}'),
    b"\x00\x00\x00",                                              # then silence: a timeout
], ids=["huge_length", "bad_json", "not_object", "nesting_bomb", "prompts_not_list",
        "unknown_kind", "stdout_not_str", "unknown_op", "truncated_header"])
def test_parent_survives_a_lying_child(payload):
    """Stand-in for a compromised child: the parent reads forged bytes instead of its replies."""
    with REPL("", llm_query=lambda p: "x", timeout_s=TIMEOUT_S) as r:
        fake_out, writer = os.pipe()
        os.set_blocking(fake_out, False)
        real_out, r._out = r._out, fake_out
        os.write(writer, payload)
        t0 = time.monotonic()
        res = r.run("x = 1")
        assert time.monotonic() - t0 < TIMEOUT_S + 1
        assert "lost" in res.error and r.restarts == 1
        assert r.run("print('ok')").stdout == "ok\n"
        os.close(real_out)  # the REPL closed the fds it held (the fake one) when it killed the child
        os.close(writer)
