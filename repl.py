"""
A persistent Python REPL for recursive language models, run in a sandboxed child process.

    python repl.py        # a tiny demo with a fake sub-model

The supervisor model writes Python; `REPL.run(code)` runs one cell in a long-lived child where
the long input is the variable `context` and the worker model is reached through
`llm_query(prompt)` and `llm_query_batched(prompts)` (one parent round trip for the whole
list). `FINAL(x)` / `FINAL_VAR(name)` set `result.final`. Names follow the RLM paper.

    with REPL(context, llm_query=worker, timeout_s=10) as repl:
        r = repl.run("print(len(context))")  # r.stdout, r.error, r.final, r.subcalls, r.seconds

Protocol: 8-byte length + JSON over the child's stdin/stdout; the context is sent once per
child. The parent serves sub-calls while the child blocks; that time is not the cell's.

Children are forked, not started: the first REPL of a process starts a fork server (`repl.py
--fork-server`, a clean `python -s -S -P` that imports the allowed modules once and never sees a
context or model code), which forks each child in ~10 ms instead of ~0.1 s for a fresh
interpreter (bench/repl.py). The server reaps its children, tells the parent their exit status,
and exits, killing any left, when the parent's end of its socket closes (the parent died).

Threat model: model-written code is untrusted. The process is the boundary; the Python layer
is defence in depth (nanoGPT #717 escaped an in-process exec via sys._getframe).
Covered:
  1. A child forked from the fork server, in its own session, holding only its three pipes
     (not the server's socket). On timeout, death or a protocol violation the parent kills its
     process group, starts a fresh child and says that state was lost; `run` returns within
     timeout_s + ~1 s. max_subcalls (per REPL lifetime) is enforced parent-side.
  2. Before user code the child sets RLIMIT_AS (memory_mb above the loaded context), a CPU
     limit per cell, RLIMIT_FSIZE 0 (no writes), RLIMIT_NPROC 0 (no fork: a root child drops
     to uid/gid 65534, as root ignores NPROC), RLIMIT_NOFILE = fds in use (no files, no
     sockets), no core files, PR_SET_NO_NEW_PRIVS and death with the fork server. Empty environment,
     a fresh empty cwd (deleted on close), and a network namespace without interfaces when
     unshare(CLONE_NEWNET) is permitted (`repl.netns`).
  3. Python: restricted builtins (no open/eval/exec/compile/input/getattr/setattr/vars/dir/
     globals/locals/breakpoint; one-argument type()); an import allow-list, checked at import
     time, that returns read-only module proxies without submodules, private names or known
     string-to-attribute/eval helpers; an AST check (parsed, not grepped) rejecting attributes
     starting with "_", frame attributes (gi_frame, f_back, tb_frame, ...), dunder names,
     string annotations (typing evals them) and bare `.format`; str.format templates may not
     read attributes. Reserved names are re-injected before every cell.
  4. stdout is capped in the child while printing, errors at 2,000 chars; the parent rejects
     malformed or oversized messages.
Not covered:
  - A CPython memory-safety bug reachable from pure Python gives native code in the child,
    bounded only by the rlimits, uid 65534 and the network namespace: no seccomp, no mount
    namespace (world-readable files, after closing an fd), no network isolation where unshare
    fails. Without root the child keeps the parent's uid: NPROC and kill() are not contained
    (it could kill the fork server, which the parent then restarts).
  - Forked children start from the server's memory: the allowed modules' state (random is
    reseeded in each child from its context), nothing of other episodes. String hashing is
    seeded too (PYTHONHASHSEED=0), so a run's episodes repeat exactly; model code can predict both.
  - Accounting is per process (RLIMIT_AS), not cgroups.
  - The parent's callables see child-written prompts (injection; cost up to max_subcalls).
"""
import _json
import ast
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ALLOWED_MODULES = ("re", "math", "json", "collections", "itertools", "functools", "statistics",
                   "string", "random", "heapq", "bisect", "datetime", "textwrap", "difflib",
                   "operator", "copy", "fractions", "decimal", "typing", "dataclasses")
# public names that turn a string into an attribute read or an eval (escape hatches)
STRIPPED = {"operator": {"attrgetter", "methodcaller"}, "string": {"Formatter"},
            "typing": {"get_type_hints", "ForwardRef"}, "dataclasses": {"FunctionType"},
            "functools": {"update_wrapper", "wraps", "singledispatch", "singledispatchmethod"}}
SAFE_BUILTINS = ("abs all any ascii bin bool bytearray bytes callable chr classmethod complex "
                 "dict divmod enumerate filter float format frozenset hash hex id int isinstance "
                 "issubclass iter len list map max min next object oct ord pow property range "
                 "repr reversed round set slice sorted staticmethod str sum super tuple zip "
                 "True False None NotImplemented Ellipsis").split()
# frame/code attributes that do not start with "_" but walk to other frames' globals
FRAME_ATTRS = frozenset("gi_frame gi_code gi_yieldfrom cr_frame cr_code cr_await cr_origin "
                        "ag_frame ag_code ag_await f_back f_builtins f_code f_globals f_locals "
                        "f_trace tb_frame tb_next".split())
# AST fields that hold identifiers (Name.id, Attribute.attr, FunctionDef.name, alias.asname, ...)
IDENT_FIELDS = ("id", "attr", "name", "asname", "module", "arg", "names", "rest", "kwd_attrs")
ERROR_CHARS = 2_000  # result.error is truncated to this (plus the line of the cell)
HEADER = struct.Struct(">Q")


@dataclass
class REPLResult:
    stdout: str = ""
    error: str | None = None   # "Type: message\n  at line N: <code>" or a timeout/crash note
    final: str | None = None   # set when the cell called FINAL / FINAL_VAR
    subcalls: int = 0          # prompts sent to the parent's model by this cell
    seconds: float = 0.0


# The wire format calls the C encoder and scanner directly: a cell may patch the json classes
# it can import (json.JSONEncoder.encode = ...) but must not corrupt the protocol that way.
_encode = _json.make_encoder(None, lambda o: json.JSONEncoder().default(o),  # raises TypeError
                             _json.encode_basestring, None, ":", ",", False, False, True)
_scan = json.JSONDecoder().scan_once


def _pack(msg):
    body = "".join(_encode(msg, 0)).encode("utf-8", "surrogatepass")
    return HEADER.pack(len(body)) + body


def _unpack(body):  # raises StopIteration or ValueError on malformed input
    return _scan(body.decode("utf-8", "surrogatepass"), 0)[0]


class _ChildFailed(Exception): pass  # the child died or broke the protocol
class _Timeout(_ChildFailed): pass


# -----------------------------------------------------------------------------
# parent side

class REPL:
    """One episode's REPL. timeout_s: wall clock per cell; memory_mb: address space above the
    loaded context; max_subcalls: llm_query/rlm_query prompts per REPL lifetime; stdout_chars:
    stdout kept per cell. close() (or `with`) kills the child and deletes its temporary cwd."""
    def __init__(self, context, llm_query=None, llm_query_batched=None, rlm_query=None,
                 timeout_s=10.0, memory_mb=512, max_subcalls=1_000, stdout_chars=20_000):
        if not isinstance(context, (str, list, dict)):
            raise TypeError(f"context must be str, list or dict, got {type(context).__name__}")
        if llm_query_batched is None and llm_query is not None:
            llm_query_batched = lambda prompts: [llm_query(p) for p in prompts]
        if llm_query is None and llm_query_batched is not None:
            llm_query = lambda prompt: llm_query_batched([prompt])[0]
        self._fns = {("llm", False): llm_query, ("llm", True): llm_query_batched,
                     ("rlm", False): rlm_query or llm_query}  # at depth 1 rlm_query = llm_query
        self.context, self.timeout_s, self.memory_mb = context, timeout_s, memory_mb
        self.max_subcalls, self.stdout_chars = max_subcalls, stdout_chars
        self.subcalls_used, self.restarts = 0, 0  # over the REPL lifetime (an episode)
        self.netns = None  # True once a child got a network namespace of its own
        self.tmpdir = tempfile.mkdtemp(prefix="repl-")
        self._max_msg = (memory_mb + 256) << 20  # a child cannot build a bigger message
        self.pid, self._closed = None, False  # pid: the current child's
        self._in = self._out = self._err = None
        self._start()

    def _start(self):
        init = _pack({"op": "init", "context": self.context, "memory_mb": self.memory_mb,
                      "timeout_s": self.timeout_s, "stdout_chars": self.stdout_chars})
        pipes = [os.pipe() for _ in range(3)]  # the child's stdin, stdout, stderr
        try:
            self.pid = _fork_server().spawn(self.tmpdir, [pipes[0][0], pipes[1][1], pipes[2][1]])
        finally:
            for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):  # the child's ends
                os.close(fd)
        if self.pid is None:
            for fd in (pipes[0][1], pipes[1][0], pipes[2][0]):
                os.close(fd)
            raise RuntimeError("the REPL child failed to start (the fork server is not answering)")
        self._in, self._out, self._err = pipes[0][1], pipes[1][0], pipes[2][0]
        self._buf, self._err_tail = bytearray(), b""
        for fd in (self._in, self._out, self._err):
            os.set_blocking(fd, False)
        try:
            deadline = time.monotonic() + 30 + self.timeout_s
            self._send(init, deadline)
            ready = self._recv(deadline)
            if ready.get("op") != "ready":
                raise _ChildFailed(f"sent {ready}")
            self.netns = ready.get("netns") is True
        except _ChildFailed as e:
            self._kill()
            tail = self._err_tail.decode(errors="replace")[-1000:]
            why = "timed out" if isinstance(e, _Timeout) else e
            raise RuntimeError(f"the REPL child failed to start ({why}): {tail}") from None

    def _kill(self):
        """Kill the child's process group and reap it; returns a description of how it ended."""
        pid, self.pid = self.pid, None
        if pid is None:
            return "not running"
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        status = _fork_server().reap(pid)
        for fd in (self._in, self._out, self._err):
            with contextlib.suppress(OSError, TypeError):
                os.close(fd)
        self._in = self._out = self._err = None
        if status is None:
            return "exit status unknown"
        if os.WIFSIGNALED(status):
            return signal.Signals(os.WTERMSIG(status)).name  # SIGXCPU: CPU limit, SIGSEGV: crash
        return f"exit code {os.waitstatus_to_exitcode(status)}"

    def _pump(self, deadline, writing=False):
        """One poll round: buffer what the child wrote; True if its stdin is writable."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise _Timeout()
        poll = select.poll()  # not select(): a busy parent may hold fds above FD_SETSIZE
        for fd in (self._out, self._err) if self._err is not None else (self._out,):
            poll.register(fd, select.POLLIN)
        if writing:
            poll.register(self._in, select.POLLOUT)
        writable = False
        for fd, _ in poll.poll(timeout * 1e3):
            if fd == self._in:
                writable = True  # or an error, which the write then reports
                continue
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            if fd == self._err:
                self._err_tail = (self._err_tail + chunk)[-4096:]
                if not chunk:
                    os.close(fd)
                    self._err = None  # closed: stop watching it
            elif not chunk:
                raise _ChildFailed("died")
            else:
                self._buf += chunk
        return writable

    def _send(self, data, deadline):
        view = memoryview(data)
        while view:
            if self._pump(deadline, writing=True):
                try:
                    view = view[os.write(self._in, view[:1 << 20]):]
                except BlockingIOError:
                    pass
                except OSError:  # BrokenPipeError: the child is gone
                    raise _ChildFailed("died") from None

    def _recv(self, deadline):
        while True:
            if len(self._buf) >= HEADER.size:
                (n,) = HEADER.unpack_from(self._buf)
                if n > self._max_msg:
                    raise _ChildFailed(f"broke the protocol (a message of {n} bytes)")
                if len(self._buf) >= HEADER.size + n:
                    body = bytes(self._buf[HEADER.size:HEADER.size + n])
                    del self._buf[:HEADER.size + n]
                    try:
                        msg = _unpack(body)
                    except (ValueError, RecursionError, StopIteration):
                        msg = None
                    if not isinstance(msg, dict):
                        raise _ChildFailed("broke the protocol (not a JSON object)")
                    return msg
            self._pump(deadline)

    def _serve(self, msg):
        """Answer one sub-call request from the child: (reply, prompts charged)."""
        kind, prompts, batched = msg.get("kind"), msg.get("prompts"), bool(msg.get("batched"))
        if (kind not in ("llm", "rlm") or not isinstance(prompts, list)
                or not all(isinstance(p, str) for p in prompts)):
            raise _ChildFailed("broke the protocol (a malformed sub-call)")
        fn, name = self._fns.get((kind, batched)), f"{kind}_query" + "_batched" * batched
        if fn is None:
            return {"error": f"{name} is not available: the REPL has no parent model"}, 0
        if self.subcalls_used + len(prompts) > self.max_subcalls:
            return {"error": f"sub-call budget exhausted: {self.subcalls_used} of max_subcalls="
                             f"{self.max_subcalls} used, {len(prompts)} more requested"}, 0
        self.subcalls_used += len(prompts)  # attempts count, even if the model call fails
        try:
            replies = list(fn(prompts)) if batched else [fn(prompts[0])]
            if len(replies) != len(prompts) or not all(isinstance(r, str) for r in replies):
                raise TypeError(f"expected {len(prompts)} str replies")
        except Exception as e:
            return {"error": f"{name} failed: {type(e).__name__}: {e}"[:ERROR_CHARS]}, len(prompts)
        return {"replies": replies}, len(prompts)

    def run(self, code: str) -> REPLResult:
        if self._closed:
            raise RuntimeError("REPL is closed")
        t0, res = time.monotonic(), REPLResult()
        try:
            if self.pid is None:  # an earlier restart failed: try again
                self._start()
            deadline = time.monotonic() + self.timeout_s
            self._send(_pack({"op": "run", "code": str(code)}), deadline)
            while (msg := self._recv(deadline)).get("op") == "llm":
                t = time.monotonic()
                reply, n = self._serve(msg)
                res.subcalls += n
                deadline += time.monotonic() - t  # the parent's model time is not the cell's
                self._send(_pack(reply), deadline)
            out, err, final = msg.get("stdout"), msg.get("error"), msg.get("final")
            if (msg.get("op") != "done" or not isinstance(out, str)
                    or not all(v is None or isinstance(v, str) for v in (err, final))):
                raise _ChildFailed("broke the protocol (a malformed reply)")
            res.stdout, res.final = out[:self.stdout_chars + 100], final
            res.error = None if err is None else err[:ERROR_CHARS + 400]
        except _ChildFailed as e:
            how, tail = self._kill(), self._err_tail.decode(errors="replace").strip()[-500:]
            res.error = self._restart(f"TimeoutError: the cell ran longer than {self.timeout_s} s"
                                      if isinstance(e, _Timeout) else
                                      f"the REPL process {e} ({how})" + (tail and f": {tail}"))
        except RuntimeError as e:  # a failed (re)start
            res.error = str(e)[:ERROR_CHARS]
        except BaseException:      # e.g. KeyboardInterrupt in the parent: no half-run child
            self._kill()
            raise
        res.seconds = time.monotonic() - t0
        return res

    def _restart(self, what):
        self.restarts += 1
        what += "; it was killed and restarted, so all REPL variables were lost."
        try:
            self._start()
        except RuntimeError as e:
            what += f" Restart failed: {e}"
        return what

    def close(self):
        if not self._closed:
            self._closed = True
            self._kill()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class _ForkServer:
    """A helper process that imports the sandbox's modules once and forks one REPL child per
    request: a fork costs milliseconds where a fresh interpreter costs ~0.1 s, nearly all of it
    imports. It runs no model code, never sees a context, reaps its children for the parent
    (who gets their exit status) and exits when the parent's end of its socket closes."""
    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message per send
        # `python -I` would also ignore PYTHONHASHSEED; the environment is built here, so -s (no user
        # site) and -P (not the script's directory on sys.path; stripped again in the server for
        # Python < 3.11) keep it as clean. A fixed hash seed makes set and dict-of-str orders in
        # model-written code the same in every run: with a random one, a root that iterates a set of
        # names asked its sub-calls in another order, and episodes differed between runs of one seed.
        flags = ["-s", "-S"] + (["-P"] if sys.version_info >= (3, 11) else [])
        self.proc = subprocess.Popen(
            [sys.executable, *flags, os.path.abspath(__file__), "--fork-server", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}, start_new_session=True)
        theirs.close()
        ours.settimeout(30)
        self.sock, self.lock, self.owner = ours, threading.Lock(), os.getpid()

    def _ask(self, msg, fds=()):
        """One request and its reply (episode threads share the server); None if it failed."""
        with self.lock:
            try:
                socket.send_fds(self.sock, [json.dumps(msg).encode()], fds)
                reply = self.sock.recv(1 << 12)
            except OSError:  # a timeout would desync later replies: retire this server
                reply = b""
            if not reply:
                self.proc.kill()
                return None
        return json.loads(reply)

    def spawn(self, cwd, fds):
        """Fork a child whose stdin, stdout, stderr are `fds`, in `cwd`; its pid or None."""
        return (self._ask({"op": "spawn", "cwd": cwd}, fds) or {}).get("pid")

    def reap(self, pid):
        """Wait (up to ~5 s) for a killed child; its wait status, or None if unknown."""
        return (self._ask({"op": "reap", "pid": pid}) or {}).get("status")


_server, _server_lock = None, threading.Lock()


def _fork_server():
    """This process's fork server, started on first use and again if it died or we forked."""
    global _server
    with _server_lock:
        if _server is None or _server.owner != os.getpid() or _server.proc.poll() is not None:
            _server = _ForkServer()
        return _server


# -----------------------------------------------------------------------------
# child side: everything below runs in the sandboxed process

class SandboxError(Exception):  # raised by check_cell, with the line of the cell
    def __init__(self, msg, lineno=None):
        super().__init__(msg)
        self.lineno = lineno


def check_cell(tree):
    """Reject syntax that walks from an object to the interpreter (defence in depth): attributes
    starting with "_" or in FRAME_ATTRS (also as `case C(attr=x)`), names starting with "__"
    (keyword arguments and methods such as __init__ aside), private imports, string annotations
    (typing evals them) and `.format` that is not called on the spot. Calls x.format(...) are
    rewritten in place to __repl_format__(x, "format", ...), which checks the template."""
    methods = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
               for n in c.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        line = getattr(node, "lineno", None)
        for field in IDENT_FIELDS:
            value = getattr(node, field, None)
            for name in value if isinstance(value, list) else [value]:
                if not isinstance(name, str):
                    continue
                if field in ("attr", "kwd_attrs"):
                    if name.startswith("_") or name in FRAME_ATTRS:
                        raise SandboxError(f"attribute {name!r} is blocked in this REPL", line)
                    if name in ("format", "format_map") and id(node) not in called:
                        raise SandboxError(f"'.{name}' may only be called directly", line)
                elif field == "module" or isinstance(node, ast.alias) and field == "name":
                    if any(part.startswith("_") for part in name.split(".")):
                        raise SandboxError(f"import of {name!r} is not allowed in this REPL", line)
                elif (name.startswith("__") and not isinstance(node, ast.keyword)
                      and id(node) not in methods):
                    raise SandboxError(f"name {name!r} is blocked in this REPL", line)
        for ann in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if ann is not None and any(isinstance(c, ast.Constant) and isinstance(c.value, str)
                                       for c in ast.walk(ann)):
                raise SandboxError("string annotations are not allowed in this REPL", line)
        # ast.walk queued this node's children before yielding it: the walk still checks f
        f = getattr(node, "func", None)  # and its value, and never sees the new Name
        if isinstance(f, ast.Attribute) and f.attr in ("format", "format_map"):
            node.func = ast.Name("__repl_format__", ast.Load())
            node.args = [f.value, ast.Constant(f.attr), *node.args]


def _safe_format(obj, method, /, *args, **kwargs):
    """Every x.format(...) in a cell lands here: templates may not read attributes ({0.attr})."""
    from _string import formatter_field_name_split as split_field, formatter_parser as parse
    template = obj
    if isinstance(obj, type) and issubclass(obj, str) and args:  # str.format(template, ...)
        template = args[0]
    todo = [template] if isinstance(template, str) else []
    while todo:
        for _, field, spec, _ in parse(todo.pop()):
            if field and any(is_attr for is_attr, _ in split_field(field)[1]):
                raise ValueError("format fields may not read attributes in this REPL; "
                                 "use an f-string")
            if spec:  # nested fields, as in '{0:{1}}'
                todo.append(spec)
    return getattr(obj, method)(*args, **kwargs)


class ModuleProxy:
    """Read-only view of a module: public, non-module attributes minus known escape hatches.
    With __slots__ and no __dict__, assigning any attribute raises AttributeError."""
    __slots__ = ("_name", "_attrs")

    def __init__(self, module):
        import types
        drop = STRIPPED.get(module.__name__, set())
        self._name = module.__name__
        self._attrs = {k: v for k, v in vars(module).items() if not k.startswith("_")
                       and k not in drop and not isinstance(v, types.ModuleType)}

    def __getattr__(self, key):
        if key == "__all__":  # for `from math import *`
            return list(self._attrs)
        try:
            return self._attrs[key]
        except KeyError:
            raise AttributeError(f"module {self._name!r} has no attribute {key!r} here") from None

    def __repr__(self):
        return f"<module {self._name!r} (sandboxed)>"


class _Stdout:
    """print() target: keeps the first `limit` chars and only counts the rest."""
    def __init__(self, limit):
        self.parts, self.kept, self.total, self.limit = [], 0, 0, limit

    def write(self, s):
        s = str.__str__(s)  # an exact str: a str subclass's own __len__/__getitem__ never run here
        self.total += len(s)
        if self.kept < self.limit:
            self.parts.append(s[:self.limit - self.kept])
            self.kept += len(self.parts[-1])

    def text(self):
        cut = self.total - self.kept
        return "".join(self.parts) + (f"\n... [truncated {cut} chars]" if cut else "")


def _format_error(e, code):
    try:
        lineno = e.lineno if isinstance(e, (SyntaxError, SandboxError)) else None
        tb = e.__traceback__
        while tb is not None:  # the innermost frame that belongs to the cell
            lineno = tb.tb_lineno if tb.tb_frame.f_code.co_filename == "<cell>" else lineno
            tb = tb.tb_next
        msg = "<the exception message could not be printed>"
        with contextlib.suppress(BaseException):
            msg = str(e)
        head = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        if len(head) > ERROR_CHARS:
            head = head[:ERROR_CHARS] + f"... [truncated {len(head) - ERROR_CHARS} chars]"
        lines = code.splitlines()
        if isinstance(lineno, int) and 1 <= lineno <= len(lines):
            head += f"\n  at line {lineno}: {lines[lineno - 1].strip()[:200]}"
        return head
    except BaseException:
        return "Error: the exception could not be formatted"


class Sandbox:
    """The child's persistent namespace and the functions the model's code can call."""
    def __init__(self, cfg, modules, rf, wf):
        import builtins
        self.rf, self.wf, self.cfg = rf, wf, cfg
        self.in_cell, self.final, self.out = False, None, _Stdout(cfg["stdout_chars"])

        def importer(name, globals=None, locals=None, fromlist=(), level=0):
            if name == "_strptime":  # datetime's C code imports it lazily through our builtins;
                return sys.modules[name]  # the AST check keeps cells from naming it
            if level != 0 or name not in modules:
                raise ImportError(f"import of {name!r} is not allowed in this REPL; allowed: "
                                  + ", ".join(ALLOWED_MODULES))
            return modules[name]

        def print_(*args, sep=" ", end="\n", file=None, flush=False):
            sep = " " if sep is None else str(sep)
            for i, a in enumerate(args):
                if i:
                    self.out.write(sep)
                self.out.write(a if type(a) is str else str(a))
            self.out.write("\n" if end is None else str(end))

        def FINAL(x):
            self.final = str(x)

        def FINAL_VAR(name):
            key = str(name).strip().strip("'\"")
            if key not in self.ns:
                raise NameError(f"FINAL_VAR: no variable named {key!r} in the REPL")
            self.final = str(self.ns[key])

        def llm_query(prompt):
            return self.ask("llm", [prompt], batched=False)[0]

        def llm_query_batched(prompts):
            return self.ask("llm", list(prompts), batched=True)

        def rlm_query(prompt):
            return self.ask("rlm", [prompt], batched=False)[0]

        self.builtins = {k: getattr(builtins, k) for k in SAFE_BUILTINS}
        self.builtins.update({k: v for k, v in vars(builtins).items()
                              if isinstance(v, type) and issubclass(v, BaseException)})
        self.builtins.update({"__build_class__": builtins.__build_class__, "__import__": importer,
                              "__repl_format__": _safe_format, "print": print_,
                              "type": lambda obj: type(obj)})  # no 3-argument class creation
        self.reserved = {"context": cfg["context"], "print": print_, "FINAL": FINAL,
                         "FINAL_VAR": FINAL_VAR, "llm_query": llm_query,
                         "llm_query_batched": llm_query_batched, "rlm_query": rlm_query}
        self.ns = {"__name__": "__repl__"}

    def ask(self, kind, prompts, batched):
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{kind}_query prompts must be str")
        if not self.in_cell:  # e.g. a __del__ running between cells would desync the pipe
            raise RuntimeError(f"{kind}_query can only be called while a cell runs")
        if not prompts:
            return []
        _write(self.wf, {"op": "llm", "kind": kind, "prompts": prompts, "batched": batched})
        reply = _read(self.rf)
        if reply is None:
            os._exit(0)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["replies"]

    def run_cell(self, code):
        import resource
        self.out, self.final, error = _Stdout(self.cfg["stdout_chars"]), None, None
        try:  # a per-cell CPU budget as a backstop to the parent's wall clock
            ru = resource.getrusage(resource.RUSAGE_SELF)
            soft = int(ru.ru_utime + ru.ru_stime + self.cfg["timeout_s"]) + 2
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            resource.setrlimit(resource.RLIMIT_CPU, (soft if hard < 0 else min(soft, hard), hard))
            tree = ast.parse(code, "<cell>", "exec")
            check_cell(tree)
            compiled = compile(ast.fix_missing_locations(tree), "<cell>", "exec", dont_inherit=True)
            self.ns["__builtins__"] = dict(self.builtins)  # fresh each cell
            self.ns.update(self.reserved)
            self.in_cell = True
            try:
                exec(compiled, self.ns)
            finally:
                self.in_cell = False
        except BaseException as e:  # SystemExit and KeyboardInterrupt included
            error = _format_error(e, code)
        return {"op": "done", "stdout": self.out.text(), "error": error, "final": self.final}


def _read(f):  # None at EOF
    header = f.read(HEADER.size)
    return _unpack(f.read(HEADER.unpack(header)[0])) if len(header) == HEADER.size else None


def _write(f, msg):
    f.write(_pack(msg))
    f.flush()


def _harden(memory_mb, nofile):
    """Network namespace, drop root, no new privileges, rlimits. Returns netns success."""
    import ctypes
    import resource
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    netns = any(libc.unshare(flags) == 0 for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET))
    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    if os.geteuid() == 0:  # root ignores RLIMIT_NPROC and may raise limits: become nobody
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (after setuid, which clears it)
    for res, value in ((resource.RLIMIT_AS, vm_bytes + (memory_mb << 20)),
                       (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NPROC, 0),
                       (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, nofile)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (value, value))
    return netns


def _child_main():
    import importlib
    import warnings
    warnings.simplefilter("ignore")
    # keep the protocol on private fds; 0 and 1 become /dev/null so nothing else can write to them
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    rf, wf = open(rfd, "rb"), open(wfd, "wb")
    cfg = _read(rf)
    # not the server's state (every child would share it): seeded by the context, so episodes over
    # different contexts draw different numbers and a rerun of the same episode draws the same
    import random
    random.seed(str(cfg.get("context", "")))
    modules = {name: ModuleProxy(importlib.import_module(name)) for name in ALLOWED_MODULES}
    for name in ("_strptime", "unicodedata"):  # imported lazily by datetime and re: pre-import
        importlib.import_module(name)             # them, as no file can be opened later
    netns = _harden(cfg["memory_mb"], nofile=max(rfd, wfd) + 1)  # no new fds after this
    box = Sandbox(cfg, modules, rf, wf)
    _write(wf, {"op": "ready", "netns": netns})
    while (msg := _read(rf)) is not None:
        _write(wf, box.run_cell(msg["code"]))


def _fork_server_main(sock_fd):
    """The fork server's loop: spawn and reap requests, one at a time, until the parent leaves."""
    import importlib
    for name in ALLOWED_MODULES + ("_strptime", "unicodedata", "ctypes", "resource", "warnings", "traceback"):
        importlib.import_module(name)  # once here rather than once per child
    sock, children = socket.socket(fileno=sock_fd), set()
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 12, 3)
        except OSError:
            data = b""
        if not data:  # the parent exited or retired us
            break
        msg = json.loads(data)
        if msg["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _forked_child(msg["cwd"], fds)  # never returns
            children.add(pid)
            for fd in fds:
                os.close(fd)
            reply = {"pid": pid}
        else:
            pid, status = msg["pid"], None
            for _ in range(5000) if pid in children else ():
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                    children.discard(pid)
                    break
                time.sleep(0.001)
            reply = {"status": status}
        sock.send(json.dumps(reply).encode())
    for pid in children:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def _forked_child(cwd, fds):
    """In a fresh fork of the fork server: own session, the parent's pipes as fds 0-2, no other
    fds (not the server's socket), then the sandboxed child proper."""
    code = 1
    try:
        os.setsid()
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(cwd)
        _child_main()
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()  # to the parent's stderr tail
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__" and sys.argv[1:2] == ["--fork-server"]:
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != _here]   # no project modules
    _fork_server_main(int(sys.argv[2]))
elif __name__ == "__main__":  # demo with a fake worker that reports the length of its prompt
    with REPL("lorem ipsum " * 500, llm_query=lambda p: f"<{len(p)} chars>", timeout_s=2) as repl:
        for cell in ["chunks = [context[i:i + 1000] for i in range(0, len(context), 1000)]\n"
                     "answers = llm_query_batched(['Summarise: ' + c for c in chunks])",
                     "print(answers[:2])\nFINAL_VAR('answers')", "import os", "while True: pass"]:
            print(f">>> {cell!r}\n{repl.run(cell)}")
