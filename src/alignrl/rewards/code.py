"""Sandboxed code-execution reward: run a candidate program against assert tests, with a verdict it cannot forge.

Tests are `assert EXPR[, message]` statements (one or more per test; a test passes when all of its asserts hold).
The caller parses each one (`ast`) and splits EXPR into *primaries*, the outermost call/attribute/subscript chains
that use a name of the solution (`f(3)`, `obj.m(2)[0]`, `ok`), and the rest (literals, comparisons, operators,
displays, comprehensions, and calls of a fixed set of builtins and `math`: `sorted(f(3)) == [1, 2]`,
`math.isclose(f(1), 0.5)`). Other statements, and primaries that use a comprehension or lambda variable of the
test (`all(f(x) == 2 * x for x in ...)`), raise AlignRLError. The message of an assert is never evaluated.

Each run then takes two fresh interpreters, one after the other:

- the candidate's process (`python -B -s -S -P`, stdlib only: the program of `sandbox_child.py`) in a new
  session and an empty private working directory, deleted afterwards. It is sent the solution and the
  primaries' source only: never a test, an expected value or a verdict. It runs the solution (an exception at its
  top level is reported but what it defined before failing stays defined), evaluates each primary in the
  solution's namespace and reports its value as plain data (None, bool, int, float, complex, str, bytes,
  bytearray, list, tuple, dict, set, frozenset; subclasses are converted to the base type, by value; anything
  else is "not plain data") on a pipe. Whatever code there does (walk frames, patch the harness, write to the
  pipe, exit early), it can at most choose these values, which is what returning an answer does.
- the checker (`python -I -S -B`, the program of `sandbox_checker.py`), started only after the candidate's whole
  process group has been killed: it runs no candidate code. It decodes the reported values and evaluates each
  test's expression over them, with only the builtins of `_SAFE_BUILTINS` and `math`, under its own CPU, memory
  and wall-clock limits (`timeout` again). A primary that raised, timed out or was not plain data fails the test
  only if the test needed its value (`x is None or f(x) == 1` short-circuits as usual); every primary is
  evaluated once, in source order.

Both programs are stdlib-only modules of this package whose text this module reads once, at import, and passes
with `-c` (see `_program_source`): neither interpreter imports alignrl or runs a file of the package by path.

The candidate's process is confined by these layers, outermost first; it reports which ones it installed in
``SandboxResult.layers``. See docs/security.md for what each stops and what is out of scope.

1. ``process``: wall-clock timeout, then SIGKILL to the whole process group; none of the caller's
   environment variables (only PATH, HOME = TMPDIR = the working directory, PYTHONHASHSEED=0, PYTHONUTF8=1);
   stdout/stderr go to files capped by RLIMIT_FSIZE, of which only the first 64 KiB are read back.
2. ``rlimits``: RLIMIT_AS (memory_mb), RLIMIT_CPU, RLIMIT_FSIZE (16 MiB per file), RLIMIT_NOFILE,
   RLIMIT_CORE=0, RLIMIT_NPROC (current task count + 64; not enforced by Linux for uid 0).
3. ``uid:nobody`` when the caller is root and the stdlib is readable by nobody; otherwise root callers get
   ``nocaps``: the child stays uid 0 with every capability dropped.
4. ``netns`` / ``userns+netns`` (Linux, where permitted): a private network namespace with no interface up.
5. ``landlock-abiN`` (Linux >= 5.13): writes only beneath the working directory (and /dev/null); reads only
   from the stdlib, system library directories and the working directory; TCP bind/connect denied (ABI 4);
   signals and abstract unix sockets scoped to the sandbox (ABI 6).
6. ``seccomp`` (Linux x86_64/aarch64): fork/vfork/exec, non-thread clone, socket(), ptrace, mount and
   namespace calls, chmod/chown/xattr/utime, setting rlimits, signalling other processes, io_uring, bpf,
   kernel modules, clock and hostname changes all fail with EPERM.
7. ``audit-hook``: a PEP 578 audit hook that refuses writes outside the working directory, reads of other
   processes' /proc entries, os.system/exec/spawn/fork, subprocess, sockets, ctypes, gc and thread-frame
   introspection, setrlimit, chmod/chown and signals to other processes. It runs inside the candidate's
   interpreter and is known to be bypassable (``os.open(..., dir_fd=...)``, ``_posixsubprocess.fork_exec``,
   reads outside /proc): a tripwire that gives clear errors to honest code, not a wall; layers 1-6 hold.

Known limits: disk use inside the working directory is bounded per file but not in total; without seccomp, a
root caller's child is not bound by RLIMIT_NPROC and processes that leave the process group survive the final
SIGKILL; a test whose verdict is computed by the solution's own code (`assert f(2).__eq__(4)`,
`assert obj.is_valid()`) is only as honest as that code; a solution function passed as a value
(`map(f, xs)`) is not plain data, so such a test fails.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.resources
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from alignrl.errors import AlignRLError
from alignrl.rewards.math import completion_text

__all__ = [
    "SandboxResult",
    "code_reward",
    "extract_code",
    "make_code_reward",
    "parse_tests",
    "run_tests",
    "run_tests_detailed",
]

_OUTPUT_CAP = 64 * 1024  # bytes of stdout/stderr read back
_FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: any file the child writes, stdout/stderr included
_RESULT_CAP = 4 * 1024 * 1024  # bytes of the result channel kept
_CHECKER_MIN_MB = 256  # memory limit of the checker process, at least
_NOFILE = 64
_NOBODY = 65534  # uid/gid of 'nobody' when the passwd database has no entry


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run: tests passed, whether it timed out, captured output, active layers."""

    passed: int
    total: int
    timed_out: bool
    exit_code: int | None
    stdout: str
    stderr: str
    layers: tuple[str, ...]
    elapsed: float

    @property
    def score(self) -> float:
        """Fraction of tests passed."""
        return self.passed / self.total if self.total else 0.0


# ----------------------------------------------------------------------------------------------------------
# The two programs run in fresh interpreters, each a stdlib-only module of this package: sandbox_child.py (the
# candidate's process: hardens itself, runs the solution, reports the primaries' values) and sandbox_checker.py
# (evaluates the tests over those values). Their text is read here, once, and passed with `-c`, not run by path:
# the sandbox's view is unchanged (no script directory on sys.path, which on Python 3.10, without -P, would put
# this package, with its math.py and code.py, first on the child's path and into its landlock read rules), and
# a later change to the files does not change the programs this process runs.
# ----------------------------------------------------------------------------------------------------------
def _program_source(name: str) -> str:
    """Text of a sandbox program module of this package, to run with `python -c`."""
    return importlib.resources.files("alignrl.rewards").joinpath(name).read_text(encoding="utf-8")


_CHILD_SOURCE = _program_source("sandbox_child.py")
_CHECKER_SOURCE = _program_source("sandbox_checker.py")


def _check_platform() -> None:
    """Raise unless this system can run the sandbox (POSIX with a Python executable)."""
    if os.name != "posix":
        raise AlignRLError(f"the code sandbox needs a POSIX system (Linux recommended), not {os.name!r}")
    if not sys.executable:
        raise AlignRLError("the code-execution sandbox needs sys.executable to start a Python child process")


def parse_tests(tests: Sequence[str] | str) -> list[str]:
    """Test statements from a list of strings, a JSON list string, or a single test block string."""
    if isinstance(tests, str):
        stripped = tests.strip()
        parsed: Any = None
        if stripped.startswith("["):
            try:
                parsed = json.loads(stripped)
            except json.JSONDecodeError:
                parsed = None
        tests = parsed if isinstance(parsed, list) else [tests]
    if not isinstance(tests, Sequence) or isinstance(tests, (bytes, bytearray)):
        raise AlignRLError(f"tests must be a list of strings or a JSON list, got {type(tests).__name__}")
    result = list(tests)
    if not result:
        raise AlignRLError("tests is empty: give at least one test statement such as 'assert f(2) == 4'")
    for test in result:
        if not isinstance(test, str):
            raise AlignRLError(f"each test must be a string of Python code, got {type(test).__name__}")
    return result


# ----------------------------------------------------------------------------------------------------------
# Test planning (in the caller): split each assert into the parts that need the candidate's names (the
# "primaries", evaluated in the candidate's process) and the rest (evaluated by the checker over their values).
# ----------------------------------------------------------------------------------------------------------
# Names a test may use that always mean these builtins (or the math module), evaluated by the checker.
_SAFE_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "chr", "complex", "dict", "divmod", "enumerate",
    "filter", "float", "format", "frozenset", "hash", "hex", "int", "isinstance", "issubclass", "iter", "len",
    "list", "map", "max", "min", "next", "oct", "ord", "pow", "range", "repr", "reversed", "round", "set",
    "slice", "sorted", "str", "sum", "tuple", "type", "zip",
)  # fmt: skip
_SAFE_NAMES = frozenset((*_SAFE_BUILTINS, "math"))
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)
_FORBIDDEN = (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)


class _TestFormError(ValueError):
    """A test that is not of a supported form (message without the test's index)."""


def _bound_by(target: ast.expr) -> set[str]:
    """Names bound by a comprehension target."""
    names = set()
    for node in ast.walk(target):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif not isinstance(node, (ast.Tuple, ast.List, ast.Starred, ast.expr_context)):
            raise _TestFormError(f"a comprehension target must be names, got {ast.unparse(target)!r}")
    return names


def _lambda_args(args: ast.arguments) -> set[str]:
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return {a.arg for a in params if a is not None}


def _free_names(node: ast.AST) -> set[str]:
    """Names an expression reads from its enclosing scope (comprehension and lambda variables excluded)."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Lambda):
        defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
        outer = set().union(*(_free_names(d) for d in defaults))
        return outer | (_free_names(node.body) - _lambda_args(node.args))
    if isinstance(node, _COMPREHENSIONS):
        free = _free_names(node.generators[0].iter)
        inner: set[str] = set()
        parts: list[ast.AST] = []
        for k, gen in enumerate(node.generators):
            if k:
                free |= _free_names(gen.iter) - inner
            inner |= _bound_by(gen.target)
            parts += gen.ifs
        parts += [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        for part in parts:
            free |= _free_names(part) - inner
        return free
    return set().union(set(), *(_free_names(child) for child in ast.iter_child_nodes(node)))


class _Planner:
    """Rewrites an assert expression for the checker, collecting the primaries the candidate evaluates."""

    def __init__(self) -> None:
        self.primaries: list[str] = []

    @staticmethod
    def _needs_candidate(node: ast.AST, bound: frozenset[str]) -> bool:
        return bool(_free_names(node) - _SAFE_NAMES - bound)

    @staticmethod
    def _checker_side(node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and sub.attr.startswith("_"):
                raise _TestFormError(f"attribute {sub.attr!r} is not allowed outside calls to the solution")

    def _primary(self, node: ast.expr, bound: frozenset[str]) -> ast.expr:
        local = _free_names(node) & bound
        if local:
            raise _TestFormError(
                f"{ast.unparse(node)!r} uses {sorted(local)[0]!r}, a comprehension or lambda variable of the "
                "test: the solution's values cannot depend on the test's own variables; write one assert per input"
            )
        self.primaries.append(ast.unparse(node))
        call = ast.Call(ast.Name("_p", ast.Load()), [ast.Constant(len(self.primaries) - 1)], [])
        return ast.copy_location(call, node)

    def expr(self, node: ast.expr, bound: frozenset[str] = frozenset()) -> ast.expr:
        if not self._needs_candidate(node, bound):
            self._checker_side(node)
            return node
        if isinstance(node, ast.Name):
            return self._primary(node, bound)
        if isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
            base = node.func if isinstance(node, ast.Call) else node.value
            if self._needs_candidate(base, bound):  # f(...), obj.m(...)[0], ...: the whole chain
                return self._primary(node, bound)
            self._checker_side(base)  # len(...), math.isclose(...), [1, 2][...]
            if isinstance(node, ast.Call):
                node.args = [self.expr(a, bound) for a in node.args]
                for kw in node.keywords:
                    kw.value = self.expr(kw.value, bound)
            elif isinstance(node, ast.Subscript):
                node.slice = self.expr(node.slice, bound)
            return node
        if isinstance(node, ast.Lambda):
            node.args.defaults = [self.expr(d, bound) for d in node.args.defaults]
            node.args.kw_defaults = [d if d is None else self.expr(d, bound) for d in node.args.kw_defaults]
            node.body = self.expr(node.body, bound | _lambda_args(node.args))
            return node
        if isinstance(node, _COMPREHENSIONS):
            inner = set(bound)
            for k, gen in enumerate(node.generators):
                gen.iter = self.expr(gen.iter, bound if k == 0 else frozenset(inner))
                inner |= _bound_by(gen.target)
                gen.ifs = [self.expr(cond, frozenset(inner)) for cond in gen.ifs]
            if isinstance(node, ast.DictComp):
                node.key = self.expr(node.key, frozenset(inner))
                node.value = self.expr(node.value, frozenset(inner))
            else:
                node.elt = self.expr(node.elt, frozenset(inner))
            return node
        for field, value in ast.iter_fields(node):  # operators, comparisons, displays, f-strings, slices
            if isinstance(value, ast.expr):
                setattr(node, field, self.expr(value, bound))
            elif isinstance(value, list):
                setattr(node, field, [self.expr(v, bound) if isinstance(v, ast.expr) else v for v in value])
        return node


@functools.lru_cache(maxsize=4096)
def _plan_test(source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(checker expressions, primaries) of one test: one or more `assert EXPR[, message]` statements."""
    try:
        tree = ast.parse(source, mode="exec")
    except SyntaxError as exc:
        raise _TestFormError(f"is not valid Python: {exc.msg} (line {exc.lineno})") from None
    except (ValueError, MemoryError, RecursionError) as exc:
        raise _TestFormError(f"cannot be parsed: {type(exc).__name__}") from None
    if not tree.body:
        raise _TestFormError("is empty: write it as 'assert f(2) == 4'")
    planner = _Planner()
    checks = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Assert):
            raise _TestFormError(
                f"only assert statements are supported (e.g. 'assert f(2) == 4'), got {ast.unparse(stmt)[:80]!r}"
            )
        for sub in ast.walk(stmt.test):
            if isinstance(sub, _FORBIDDEN):
                raise _TestFormError(f"{type(sub).__name__} ({ast.unparse(sub)[:80]!r}) is not supported")
        try:
            checks.append(ast.unparse(ast.fix_missing_locations(planner.expr(stmt.test))))
        except RecursionError:
            raise _TestFormError("is nested too deeply") from None
    return tuple(checks), tuple(planner.primaries)


def _plan_tests(tests: Sequence[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Plans of each test, or AlignRLError naming the first unsupported one."""
    plans = []
    for i, test in enumerate(tests):
        try:
            plans.append(_plan_test(test))
        except _TestFormError as exc:
            sep = " " if str(exc).startswith(("is ", "cannot")) else ": "
            raise AlignRLError(f"test {i}{sep}{exc}") from None
    return plans


def _validate_limits(timeout: float, memory_mb: int, cpu_seconds: int | None) -> int:
    """Check the sandbox limits and return the CPU-seconds limit to use."""
    if not isinstance(timeout, (int, float)) or not timeout > 0 or math.isinf(timeout):
        raise AlignRLError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise AlignRLError(f"memory_mb must be an integer >= 64, got {memory_mb!r}")
    if cpu_seconds is None:
        return math.ceil(timeout) + 1
    if not isinstance(cpu_seconds, int) or cpu_seconds < 1:
        raise AlignRLError(f"cpu_seconds must be a positive integer, got {cpu_seconds!r}")
    return cpu_seconds


def _nobody_ids() -> tuple[int, int]:
    """uid and gid of the unprivileged 'nobody' account."""
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return _NOBODY, _NOBODY


def _read_head(path: str, limit: int) -> str:
    """First `limit` bytes of a file, decoded leniently; '' if unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _collect(fd: int, deadline: float, cap: int) -> tuple[bytes, bool]:
    """Read a pipe until EOF or the deadline, keeping at most `cap` bytes; returns (data, timed_out)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), True
        if not poller.poll(max(1, math.ceil(remaining * 1000))):
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks), False
        if size < cap:
            chunks.append(data[: cap - size])
            size += len(chunks[-1])


def _remove_tree(path: str) -> None:
    """Delete a sandbox directory, restoring permissions the candidate may have removed."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(os.path.join(root, name), 0o700, follow_symlinks=False)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _layers_of(data: bytes) -> tuple[str, ...]:
    """Layers the harness reported in its first line, written before any candidate code ran."""
    first = data.split(b"\n", 1)[0]
    if not first.startswith(b"layers "):
        return ()
    return tuple(x for x in first[7:].decode("ascii", "replace").split(",") if x)


def _checker_input(
    plans: list[tuple[tuple[str, ...], tuple[str, ...]]], data: bytes, *, memory_mb: int, cpu_seconds: int
) -> bytes:
    """The checker's stdin: a JSON header line (tests, primaries, builtins, limits), then the result channel."""
    tests, primaries = [], []
    for checks, prims in plans:
        tests.append([list(checks), len(primaries)])
        primaries += prims
    header = {
        "tests": tests,
        "primaries": primaries,
        "safe": list(_SAFE_BUILTINS),
        "memory_bytes": max(memory_mb, _CHECKER_MIN_MB) * 1024 * 1024,
        "cpu_seconds": cpu_seconds,
    }
    return json.dumps(header).encode() + b"\n" + data


def _check(
    plans: list[tuple[tuple[str, ...], tuple[str, ...]]],
    data: bytes,
    *,
    base: str,
    timeout: float,
    memory_mb: int,
    cpu_seconds: int,
) -> tuple[dict[int, str | None], bool]:
    """Verdicts of the checker process per test (None: passed; else why not) and whether it timed out."""
    payload = _checker_input(plans, data, memory_mb=memory_mb, cpu_seconds=cpu_seconds)
    argv = [sys.executable, "-I", "-S", "-B", "-c", _CHECKER_SOURCE]
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONUTF8": "1"}
    timed_out = False
    try:
        proc = subprocess.run(
            argv, input=payload, capture_output=True, timeout=timeout, env=env, cwd=base, start_new_session=True
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc, timed_out = exc.stdout or b"", exc.stderr or b"", None, True
    except OSError as exc:
        raise AlignRLError(f"cannot start the code reward's checker {sys.executable}: {exc}") from None
    verdicts: dict[int, str | None] = {}
    for line in out.decode("utf-8", "replace").splitlines():
        index, _, rest = line.partition(" ")
        if index.isdigit() and int(index) < len(plans) and int(index) not in verdicts:
            verdicts[int(index)] = None if rest == "1" else rest[2:] or "failed"
    if not verdicts and not timed_out:  # the checker runs no candidate code: this is not the candidate's doing
        lines = err.decode("utf-8", "replace").strip().splitlines() or [f"exit code {rc}"]
        raise AlignRLError(f"the code reward's checker failed: {lines[-1][:300]}")
    return verdicts, timed_out


def _run_sandboxed(
    code: str,
    tests: list[str],
    *,
    timeout: float,
    memory_mb: int,
    cpu_seconds: int,
    disable: Sequence[str] = (),
) -> SandboxResult:
    """Run `code` and the tests' primaries in a hardened child, then the checker on the values it reported;
    `disable` (testing only) skips named optional layers."""
    plans = _plan_tests(tests)
    primaries = [[t, source] for t, (_checks, prims) in enumerate(plans) for source in prims]
    base = tempfile.mkdtemp(prefix="alignrl-sandbox-")
    start = time.monotonic()
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        drop = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            drop = _nobody_ids()
            os.chown(work, *drop)
            os.chmod(base, 0o711)  # nobody may traverse to its working directory, not list it
        out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
        read_fd, write_fd = os.pipe()
        try:
            payload = {
                "code": code,
                "primaries": primaries,
                "workdir": work,
                "result_fd": write_fd,
                "memory_bytes": memory_mb * 1024 * 1024,
                "cpu_seconds": cpu_seconds,
                "fsize": _FILE_SIZE_LIMIT,
                "nofile": _NOFILE,
                "drop": drop,
                "disable": list(disable),
            }
            try:
                proc = _spawn(payload, work, out_path, err_path, write_fd)
            except OSError as exc:
                raise AlignRLError(f"cannot start the sandbox interpreter {sys.executable}: {exc}") from None
            finally:
                os.close(write_fd)
            try:
                data, timed_out = _collect(read_fd, start + timeout, _RESULT_CAP)
            finally:
                # The leader is not reaped yet, so its process group id cannot have been reused.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            os.close(read_fd)
        layers = _layers_of(data)
        if not layers and not timed_out:  # the harness died before the candidate ran: not its fault
            lines = _read_head(err_path, _OUTPUT_CAP).strip().splitlines() or [f"exit code {proc.returncode}"]
            raise AlignRLError(f"the code sandbox failed to start (memory_mb too small?): {lines[-1][:300]}")
        # Only now, with the candidate's processes gone, do the tests' full expressions exist in a process.
        verdicts, check_timed_out = _check(
            plans, data, base=base, timeout=timeout, memory_mb=memory_mb, cpu_seconds=cpu_seconds
        )
        notes = "".join(
            f"[sandbox] test {t} failed: {verdicts.get(t, 'no verdict (the checker timed out)')}\n"
            for t in range(len(tests))
            if verdicts.get(t, "") is not None
        )
        return SandboxResult(
            passed=sum(1 for t in range(len(tests)) if t in verdicts and verdicts[t] is None),
            total=len(tests),
            timed_out=timed_out or check_timed_out,
            exit_code=proc.returncode,
            stdout=_read_head(out_path, _OUTPUT_CAP),
            stderr=_read_head(err_path, _OUTPUT_CAP) + notes,
            layers=("process", *layers),
            elapsed=time.monotonic() - start,
        )
    finally:
        _remove_tree(base)


def _spawn(
    payload: dict[str, Any], work: str, out_path: str, err_path: str, result_fd: int
) -> subprocess.Popen[bytes]:
    """Start the child interpreter with the payload on stdin and output redirected to files."""
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0", "PYTHONUTF8": "1"}
    argv = [sys.executable, "-B", "-s", "-S"]
    if sys.version_info >= (3, 11):
        argv.append("-P")
    argv += ["-c", _CHILD_SOURCE]
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write(json.dumps(payload).encode())
        stdin_file.seek(0)
        with open(out_path, "wb") as out_file, open(err_path, "wb") as err_file:
            return subprocess.Popen(
                argv,
                stdin=stdin_file,
                stdout=out_file,
                stderr=err_file,
                cwd=work,
                env=env,
                pass_fds=(result_fd,),
                start_new_session=True,
                close_fds=True,
            )


def run_tests_detailed(
    code: str,
    tests: Sequence[str] | str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    cpu_seconds: int | None = None,
) -> SandboxResult:
    """Run `code` and then each test statement in the sandbox; returns counts, output and active layers."""
    _check_platform()
    cpu = _validate_limits(timeout, memory_mb, cpu_seconds)
    if not isinstance(code, str):
        raise AlignRLError(f"code must be a string, got {type(code).__name__}")
    return _run_sandboxed(code, parse_tests(tests), timeout=timeout, memory_mb=memory_mb, cpu_seconds=cpu)


def run_tests(
    code: str,
    tests: list[str] | str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 512,
    cpu_seconds: int | None = None,
) -> float:
    """Fraction of test statements (e.g. "assert f(2) == 4") that pass after running `code` in the sandbox."""
    result = run_tests_detailed(code, tests, timeout=timeout, memory_mb=memory_mb, cpu_seconds=cpu_seconds)
    return result.score


_FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_LANGS = frozenset({"python", "py", "python3", "py3"})


def extract_code(text: str) -> str:
    """The last ```python fenced block of a completion, else its last fenced block, else the raw text."""
    text = completion_text(text)
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(text)]
    python_blocks = [body for lang, body in blocks if lang in _PYTHON_LANGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return text


# Keywords that would be sandbox options of the reward but can only arrive here as dataset columns.
_OPTION_COLUMNS = ("timeout", "memory_mb", "cpu_seconds")


def _code_rewards(
    completions: list[Any],
    tests: list[Any],
    columns: dict[str, Any],
    *,
    timeout: float,
    memory_mb: int,
    cpu_seconds: int | None,
) -> list[float]:
    """Fraction of each sample's tests passed by the code in its completion, run in the sandbox."""
    _check_platform()
    cpu = _validate_limits(timeout, memory_mb, cpu_seconds)
    for name in _OPTION_COLUMNS:
        if name in columns:
            warnings.warn(
                f"code reward: ignoring column {name!r}: sandbox limits are not taken from the data "
                f"(use alignrl.rewards.code.make_code_reward({name}=...) in a reward module)",
                stacklevel=3,
            )
    if isinstance(tests, str) or len(tests) != len(completions):
        got = "a string" if isinstance(tests, str) else f"{len(tests)} entries"
        raise AlignRLError(f"column 'tests' needs one entry per completion: {got} for {len(completions)}")
    test_lists: list[list[str]] = []
    for i, sample_tests in enumerate(tests):
        try:
            test_lists.append(parse_tests(sample_tests))
            _plan_tests(test_lists[-1])
        except AlignRLError as exc:
            raise AlignRLError(f"column 'tests', sample {i}: {exc}") from None
    codes = [extract_code(completion_text(c)) for c in completions]
    rewards = [0.0] * len(completions)
    todo = [i for i, code in enumerate(codes) if code.strip()]
    if not todo:
        return rewards
    workers = max(1, min(4, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alignrl-sandbox") as pool:
        futures = {
            i: pool.submit(
                _run_sandboxed, codes[i], test_lists[i], timeout=timeout, memory_mb=memory_mb, cpu_seconds=cpu
            )
            for i in todo
        }
        for i, future in futures.items():
            rewards[i] = future.result().score
    return rewards


def make_code_reward(
    *, timeout: float = 5.0, memory_mb: int = 512, cpu_seconds: int | None = None
) -> Callable[..., list[float]]:
    """A `code` reward with its own sandbox limits, e.g. in a reward module named in reward_funcs
    (`my_rewards.py:code_30s` with `code_30s = make_code_reward(timeout=30)`)."""
    _validate_limits(timeout, memory_mb, cpu_seconds)

    def code_reward(
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        *,
        tests: list[Any],
        **columns: Any,
    ) -> list[float]:
        """Fraction of each sample's tests passed by the code in its completion; other columns are ignored."""
        return _code_rewards(
            completions, tests, columns, timeout=timeout, memory_mb=memory_mb, cpu_seconds=cpu_seconds
        )

    return code_reward


code_reward = make_code_reward()  # 5 s, 512 MiB
code_reward.__doc__ = """Fraction of each sample's tests passed by the code in its completion, run in the sandbox
(5 s, 512 MiB). Called like TRL reward functions, with every dataset column as a keyword: only `tests` is used;
the other columns, including any named `timeout`, `memory_mb` or `cpu_seconds`, cannot change the sandbox's
limits (those warn). For other limits use `make_code_reward(timeout=..., memory_mb=..., cpu_seconds=...)`."""
