"""Sandboxed code-execution reward: scoring, and attacks that must end in time leaving the caller unharmed."""

from __future__ import annotations

import ast
import collections
import enum
import io
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from alignrl.errors import AlignRLError
from alignrl.rewards import code as code_mod
from alignrl.rewards import required_columns, sandbox_checker, sandbox_child
from alignrl.rewards.code import (
    code_reward,
    extract_code,
    make_code_reward,
    parse_tests,
    run_tests,
    run_tests_detailed,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the code sandbox needs a POSIX system")

TIMEOUT = 2.0  # seconds; every attack below must end within about this long
DOUBLE = "def f(x):\n    return 2 * x\n"
DOUBLE_TESTS = ["assert f(2) == 4", "assert f(0) == 0", "assert f(-3) == -6"]


def _process_count() -> int:
    """Number of processes on the system (Linux: /proc entries), or -1 where unknown."""
    try:
        return sum(1 for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return -1


def _maxrss_kib() -> int:
    """Peak resident memory of this process in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def _sandbox_dirs() -> set[str]:
    """Sandbox working directories currently in the temp dir."""
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("alignrl-sandbox-")}


def _hard_layers() -> tuple[str, ...]:
    """Layers active here, from a trivial run."""
    return run_tests_detailed("x = 1", ["assert x == 1"], timeout=TIMEOUT).layers


# ---------------------------------------------------------------- scoring


def test_passing_partial_and_failing_solutions() -> None:
    assert run_tests(DOUBLE, DOUBLE_TESTS, timeout=TIMEOUT) == 1.0
    half = "def f(x):\n    return x * x\n"  # right for 2 and 0, wrong for -3
    assert run_tests(half, DOUBLE_TESTS, timeout=TIMEOUT) == pytest.approx(2 / 3)
    assert (
        run_tests("def f(x):\n    return 0\n", ["assert f(1) == 2", "assert f(3) == 6"], timeout=TIMEOUT)
        == 0.0
    )
    assert run_tests("def f(x) return", DOUBLE_TESTS, timeout=TIMEOUT) == 0.0  # syntax error


def test_detailed_result_reports_output_and_layers() -> None:
    res = run_tests_detailed(
        "print('hello')\n" + DOUBLE, ["assert f(1) == 2", "assert f(1) == 3"], timeout=TIMEOUT
    )
    assert (res.passed, res.total, res.timed_out) == (1, 2, False)
    assert res.score == 0.5
    assert "hello" in res.stdout
    assert "test 1 failed: AssertionError" in res.stderr
    assert "process" in res.layers and "rlimits" in res.layers
    if sys.platform.startswith("linux"):
        assert "audit-hook" in res.layers


def test_tests_as_json_string_and_single_block() -> None:
    assert run_tests(DOUBLE, '["assert f(1) == 2", "assert f(2) == 5"]', timeout=TIMEOUT) == 0.5
    assert run_tests(DOUBLE, "assert f(1) == 2\nassert f(2) == 4", timeout=TIMEOUT) == 1.0
    assert parse_tests("assert True") == ["assert True"]
    assert parse_tests('["a", "b"]') == ["a", "b"]
    with pytest.raises(AlignRLError, match="empty"):
        parse_tests([])
    with pytest.raises(AlignRLError, match="string"):
        parse_tests([1, 2])  # type: ignore[list-item]


def test_solution_raising_at_top_level_keeps_its_definitions() -> None:
    code = DOUBLE + "print(f(int(input())))\n"  # input() hits EOF: stdin is /dev/null
    assert run_tests(code, DOUBLE_TESTS, timeout=TIMEOUT) == 1.0


def test_stdlib_threads_and_files_in_workdir_work() -> None:
    code = (
        "import threading, json, tempfile, collections, dataclasses\n"
        "box = []\n"
        "t = threading.Thread(target=box.append, args=(1,)); t.start(); t.join()\n"
        "open('data.json', 'w').write(json.dumps({'a': 1}))\n"
        "with tempfile.TemporaryFile() as tf:\n    tf.write(b'ok')\n"
        "P = collections.namedtuple('P', 'x y')\n"
    )
    tests = ["assert box == [1]", "assert json.load(open('data.json')) == {'a': 1}", "assert P(1, 2).y == 2"]
    assert run_tests(code, tests, timeout=TIMEOUT) == 1.0


def test_invalid_limits_raise() -> None:
    with pytest.raises(AlignRLError, match="timeout"):
        run_tests(DOUBLE, DOUBLE_TESTS, timeout=0)
    with pytest.raises(AlignRLError, match="memory_mb"):
        run_tests(DOUBLE, DOUBLE_TESTS, memory_mb=8)
    with pytest.raises(AlignRLError, match="cpu_seconds"):
        run_tests(DOUBLE, DOUBLE_TESTS, cpu_seconds=0)


def test_non_posix_platform_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(code_mod.os, "name", "nt")
    with pytest.raises(AlignRLError, match="POSIX"):
        run_tests(DOUBLE, DOUBLE_TESTS)


def test_infrastructure_failures_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(code_mod, "_CHILD_SOURCE", "import sys\nsys.exit('harness exploded')\n")
        with pytest.raises(AlignRLError, match="failed to start.*harness exploded"):
            run_tests(DOUBLE, DOUBLE_TESTS, timeout=TIMEOUT)
    monkeypatch.setattr(code_mod.sys, "executable", "/nonexistent/python")
    with pytest.raises(AlignRLError, match="cannot start"):
        run_tests(DOUBLE, DOUBLE_TESTS, timeout=TIMEOUT)


def test_workdir_is_removed() -> None:
    before = _sandbox_dirs()
    run_tests("import os\nos.mkdir('locked', 0)\nopen('f', 'w').write('x')", ["assert True"], timeout=TIMEOUT)
    assert _sandbox_dirs() <= before


# ---------------------------------------------------------------- resource attacks


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    res = run_tests_detailed("while True:\n    pass\n", DOUBLE_TESTS, timeout=TIMEOUT)
    assert res.timed_out and res.score == 0.0
    assert time.monotonic() - start < TIMEOUT + 3


def test_tests_finished_before_a_timeout_still_count() -> None:
    code = "def f(x):\n    while x < 0:\n        pass\n    return 2 * x\n"  # hangs on negative input
    res = run_tests_detailed(code, DOUBLE_TESTS, timeout=TIMEOUT)
    assert res.timed_out and res.passed == 2


def test_cpu_limit_kills_busy_loop_before_wall_timeout() -> None:
    start = time.monotonic()
    res = run_tests_detailed("while True:\n    pass\nok = True\n", ["assert ok"], timeout=30, cpu_seconds=1)
    assert res.score == 0.0 and not res.timed_out
    assert time.monotonic() - start < 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is only enforced on Linux")
def test_memory_bomb_fails_fast() -> None:
    before = _maxrss_kib()
    start = time.monotonic()
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\nok = True\n"
    assert run_tests(code, ["assert ok"], timeout=TIMEOUT, memory_mb=256) == 0.0
    assert time.monotonic() - start < TIMEOUT + 3
    assert _maxrss_kib() - before < 100 * 1024


def test_huge_stdout_is_capped() -> None:
    before = _maxrss_kib()
    start = time.monotonic()
    code = "import sys\nchunk = 'x' * 10**8\nwhile True:\n    print(chunk)\n"
    res = run_tests_detailed(code + DOUBLE, DOUBLE_TESTS, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + 3
    assert len(res.stdout) <= 64 * 1024
    assert _maxrss_kib() - before < 100 * 1024
    assert res.score == 0.0  # print raised "file too large" before f was defined


def test_fork_bomb_is_contained() -> None:
    before = _process_count()
    start = time.monotonic()
    bomb = "import os\nwhile True:\n    os.fork()\nok = True\n"
    assert run_tests(bomb, ["assert ok"], timeout=TIMEOUT) == 0.0
    if "seccomp" in _hard_layers():  # without the audit hook, the kernel filter alone must stop it
        res = code_mod._run_sandboxed(
            bomb, ["assert ok"], timeout=TIMEOUT, memory_mb=256, cpu_seconds=3, disable=("audit-hook",)
        )
        assert res.score == 0.0
    assert time.monotonic() - start < 2 * TIMEOUT + 5
    if before >= 0:
        deadline = time.monotonic() + 5
        while _process_count() > before + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _process_count() <= before + 20
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30)  # the caller can still spawn


# ---------------------------------------------------------------- escape attempts


def test_os_system_is_blocked(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    code = f"import os\nrc = os.system('touch {target}')\n"
    assert run_tests(code, ["assert rc == 0"], timeout=TIMEOUT) == 0.0
    if "seccomp" in _hard_layers():
        res = code_mod._run_sandboxed(
            code, ["assert rc == 0"], timeout=TIMEOUT, memory_mb=256, cpu_seconds=3, disable=("audit-hook",)
        )
        assert res.score == 0.0
    assert not target.exists()


def test_subprocess_is_blocked(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    code = f"import subprocess\nsubprocess.run(['touch', '{target}'])\nok = True\n"
    assert run_tests(code, ["assert ok"], timeout=TIMEOUT) == 0.0
    assert not target.exists()


@pytest.mark.parametrize(
    "writer",
    [
        "open({path!r}, 'w').write('x')",
        "import os\nfd = os.open({path!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        "import os, pathlib\nos.symlink({parent!r}, 'link')\npathlib.Path('link', 'pwned').write_text('x')",
        "import shutil\nopen('local', 'w').write('x')\nshutil.copy('local', {path!r})",
    ],
)
def test_writing_outside_the_workdir_is_blocked(tmp_path: Path, writer: str) -> None:
    target = tmp_path / "pwned"
    code = writer.format(path=str(target), parent=str(tmp_path)) + "\nok = True\n"
    assert run_tests(code, ["assert ok"], timeout=TIMEOUT) == 0.0
    layers = _hard_layers()
    if any(layer.startswith("landlock") for layer in layers) or "uid:nobody" in layers:
        res = code_mod._run_sandboxed(
            code, ["assert ok"], timeout=TIMEOUT, memory_mb=256, cpu_seconds=3, disable=("audit-hook",)
        )
        assert res.score == 0.0
    assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_network_is_blocked() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    attempts = [
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nok = True\n",
        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\nok = True\n",
    ]
    try:
        for code in attempts:
            assert run_tests(code, ["assert ok"], timeout=TIMEOUT) == 0.0
            if "seccomp" in _hard_layers():
                res = code_mod._run_sandboxed(
                    code,
                    ["assert ok"],
                    timeout=TIMEOUT,
                    memory_mb=256,
                    cpu_seconds=3,
                    disable=("audit-hook",),
                )
                assert res.score == 0.0
        with pytest.raises(socket.timeout):
            conn, _ = server.accept()
            conn.close()
    finally:
        server.close()


def test_environment_secret_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNRL_TEST_SECRET", "s3cret-value")
    code = "import os\nseen = os.environ.get('ALIGNRL_TEST_SECRET')\n"
    tests = [
        "assert seen == 's3cret-value'",
        "assert b's3cret' in open('/proc/%d/environ' % os.getppid(), 'rb').read()",
        "assert 'ALIGNRL_TEST_SECRET' in os.environ",
        "assert os.environ['HOME'] == os.getcwd()",  # control: the child does see its own minimal env
    ]
    res = run_tests_detailed(code, tests, timeout=TIMEOUT)
    assert (res.passed, res.total) == (1, 4)


def test_signalling_the_caller_is_blocked() -> None:
    code = "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\nok = True\n"
    assert run_tests(code, ["assert ok"], timeout=TIMEOUT) == 0.0
    if "seccomp" in _hard_layers():
        res = code_mod._run_sandboxed(
            code, ["assert ok"], timeout=TIMEOUT, memory_mb=256, cpu_seconds=3, disable=("audit-hook",)
        )
        assert res.score == 0.0
    assert run_tests(DOUBLE, DOUBLE_TESTS, timeout=TIMEOUT) == 1.0  # we were not stopped


def test_forged_result_lines_do_not_count() -> None:
    forger = (
        "import os, sys\n"
        "fake = b'0 0 1\\n0 1 1\\n0 2 1\\nPASSED 3/3\\n' + b''.join(b'%x %d 1\\n' % (n, i)"
        " for n in range(16) for i in range(3))\n"
        "for fd in range(64):\n"
        "    try:\n        os.write(fd, fake)\n    except OSError:\n        pass\n"
        "print('3/3 tests passed')\n"
        "def f(x):\n    return 0\n"
    )
    # the first report of each value counts: the forged lines pre-empt f's own values and say nothing that passes
    assert run_tests(forger, DOUBLE_TESTS, timeout=TIMEOUT) == 0.0
    early_exit = (
        "import os\ndef f(x):\n    return 2 * x\nos._exit(0)\n"  # report nothing, exit "successfully"
    )
    assert run_tests(early_exit, DOUBLE_TESTS, timeout=TIMEOUT) == 0.0
    closes_channel = "import os\nos.close(3)\n" + DOUBLE
    assert run_tests(closes_channel, DOUBLE_TESTS, timeout=TIMEOUT) == 0.0
    sys_exit = DOUBLE + "import sys\nsys.exit(0)\n"  # SystemExit at top level must not skip the tests
    assert run_tests(sys_exit, ["assert f(1) == 3"], timeout=TIMEOUT) == 0.0


# ---------------------------------------------------------------- forging the verdict from inside the sandbox
# Each attack below leaves f wrong (f(x) = x + 100) and must score 0 on ATTACK_TESTS, whose expected values no
# constant matches; HONEST scores 1.0 on the same tests, so each test can fail.

ATTACK_TESTS = ["assert f(1) == 2", "assert 6 == f(3)", "assert f(-2) == -4"]
HONEST = "def f(x):\n    return 2 * x\n"
WRONG = "def f(x):\n    return x + 100\n"

FRAMES_BY_TRACEBACK = """
def _frames():
    try:
        raise RuntimeError
    except RuntimeError as exc:
        frame = exc.__traceback__.tb_frame
    while frame is not None:
        yield frame
        frame = frame.f_back
"""
FRAMES_BY_GETFRAME = """
import sys
def _frames():
    frame = sys._getframe(0)
    while frame is not None:
        yield frame
        frame = frame.f_back
"""
OVERWRITE_RESULTS = """
for _frame in list(_frames()):
    _loc = _frame.f_locals
    if "ok_lines" in _loc and "fail_lines" in _loc:  # copy the harness's pass lines over its fail lines
        _loc["fail_lines"][:] = _loc["ok_lines"]
    for _value in list(_loc.values()):  # and turn any other list of result lines into passes
        if isinstance(_value, list):
            for _i, _item in enumerate(_value):
                if isinstance(_item, bytes) and _item.endswith(b" 0\\n"):
                    _value[_i] = _item[:-3] + b" 1\\n"
"""
REPLACE_TESTS = """
import types
_pass_stmt = compile("assert True", "<forged>", "exec")
_true_expr = compile("True", "<forged>", "eval")
for _frame in list(_frames()):
    for _value in list(_frame.f_locals.values()):
        if isinstance(_value, list):
            for _i, _item in enumerate(_value):
                if isinstance(_item, types.CodeType):  # a compiled test: make it pass
                    _value[_i] = _pass_stmt
                elif isinstance(_item, tuple) and any(isinstance(x, types.CodeType) for x in _item):
                    _value[_i] = tuple(_true_expr if isinstance(x, types.CodeType) else x for x in _item)
"""
WRITE_AND_EXIT = """
import os
for _frame in list(_frames()):
    _loc = _frame.f_locals
    if "ok_lines" in _loc:  # the harness's own pass lines, nonce included
        os.write(_loc["result_fd"], b"".join(_loc["ok_lines"]) + _loc["done_line"])
        os._exit(0)
    if "result_fd" in _loc:  # any result channel: claim a passing-looking value for everything
        _lines = b"".join(b'%d ["b",true]\\n%d 1\\n' % (i, i) for i in range(64))
        os.write(_loc["result_fd"], b"compiled\\n" + _lines + b"done\\n")
        os._exit(0)
"""


def _assert_scores_zero_and_caller_unharmed(code: str, tests: list[str] = ATTACK_TESTS) -> None:
    before = _sandbox_dirs()
    start = time.monotonic()
    res = run_tests_detailed(code, tests, timeout=TIMEOUT)
    assert (res.passed, res.score) == (0, 0.0), res
    # the verdict does not rest on the in-kernel layers or the audit hook: without them it is still 0
    every = ("netns", "landlock", "seccomp", "audit-hook")
    bare = code_mod._run_sandboxed(code, tests, timeout=TIMEOUT, memory_mb=256, cpu_seconds=3, disable=every)
    assert bare.passed == 0 and not {"seccomp", "audit-hook"} & set(bare.layers), bare
    assert time.monotonic() - start < 3 * TIMEOUT + 3
    assert _sandbox_dirs() <= before
    os.kill(os.getpid(), 0)
    assert run_tests(HONEST, tests, timeout=TIMEOUT) == 1.0  # the sandbox still works, and the tests can pass


@pytest.mark.parametrize("frames", [FRAMES_BY_TRACEBACK, FRAMES_BY_GETFRAME], ids=["traceback", "getframe"])
@pytest.mark.parametrize(
    "attack", [OVERWRITE_RESULTS, REPLACE_TESTS, WRITE_AND_EXIT], ids=["overwrite", "replace", "write-exit"]
)
def test_frame_walking_cannot_forge_the_verdict(frames: str, attack: str) -> None:
    # run at import time (top level of the solution) and again from inside f, when the harness evaluates it
    at_top = frames + attack + WRONG
    in_call = frames + "def f(x):\n" + "".join(f"    {line}\n" for line in attack.splitlines()) + "    return x + 100\n"
    _assert_scores_zero_and_caller_unharmed(at_top)
    _assert_scores_zero_and_caller_unharmed(in_call)


@pytest.mark.parametrize(
    "solution",
    [
        "class Eq:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def f(x):\n    return Eq()\n",
        "class Eq(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def f(x):\n    return Eq(0)\n",
        "class Eq(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
        "def f(x):\n    return Eq('')\n",
        "class Eq(list):\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
        "        return False\n    def __iter__(self):\n        return iter([2, 6, -4])\n"
        "def f(x):\n    return Eq()\n",
    ],
    ids=["object", "int-subclass", "str-subclass", "list-subclass"],
)
def test_fake_equality_does_not_pass(solution: str) -> None:
    _assert_scores_zero_and_caller_unharmed(solution)


def test_plain_subclasses_compare_by_value() -> None:
    code = (
        "import collections, enum\n"
        "class Two(enum.IntEnum):\n    TWO = 2\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "def two():\n    return Two.TWO\n"
        "def point():\n    return P(1, 2)\n"
        "def counts(s):\n    return collections.Counter(s)\n"
    )
    tests = ["assert two() == 2", "assert point() == (1, 2)", "assert counts('aab') == {'a': 2, 'b': 1}"]
    assert run_tests(code, tests, timeout=TIMEOUT) == 1.0


def test_fake_results_on_every_descriptor_do_not_count() -> None:
    forged = (
        b"compiled\n" + b"".join(b'%d ["b",true]\n%d 1\n%x %d 1\n' % (i, i, n, i) for i in range(16) for n in range(3))
    )
    code = f"import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, {forged!r})\n"
    code += "    except OSError:\n        pass\n" + WRONG
    _assert_scores_zero_and_caller_unharmed(code)


def test_monkeypatching_the_child_does_not_forge_the_verdict() -> None:
    code = (
        "import builtins, json, sys\n"
        "json.dumps = lambda *a, **k: '[\"b\",true]'\n"
        "json.loads = lambda *a, **k: True\n"
        "builtins.isinstance = lambda *a: True\n"
        "builtins.issubclass = lambda *a: True\n"
        "builtins.AssertionError = type('AssertionError', (BaseException,), {})\n"
        "builtins.bool = lambda *a: True\n"
        "main = sys.modules['__main__']\n"
        "for name, obj in list(vars(main).items()):\n"
        "    if callable(obj) and name.startswith('_'):\n"
        "        setattr(main, name, lambda *a, **k: ['b', True])\n"
        "builtins.type = lambda *a: int\n"
    ) + WRONG
    _assert_scores_zero_and_caller_unharmed(code)


def test_expected_values_never_reach_the_candidate() -> None:
    dump = (
        "import sys, types\n"
        "seen = []\n"
        "def walk(v, depth=0):\n"
        "    if depth > 6 or v is seen:\n        return\n"
        "    if isinstance(v, types.CodeType):\n"
        "        for c in v.co_consts:\n            walk(c, depth + 1)\n"
        "    elif isinstance(v, (list, tuple, set, frozenset)):\n"
        "        for c in v:\n            walk(c, depth + 1)\n"
        "    elif isinstance(v, dict):\n"
        "        for k, c in v.items():\n            walk(k, depth + 1); walk(c, depth + 1)\n"
        "    elif isinstance(v, (str, bytes)):\n        seen.append(repr(v))\n"
        "def f(x):\n"
        "    frame = sys._getframe(0)\n"
        "    while frame is not None:\n"
        "        walk(frame.f_code); walk(dict(frame.f_locals)); walk(dict(frame.f_globals))\n"
        "        frame = frame.f_back\n"
        "    walk(sys.argv); walk(open('/proc/self/cmdline', 'rb').read())\n"
        "    print('\\n'.join(seen))\n"
        "    return 'guess'\n"
    )
    res = run_tests_detailed(dump, ["assert f(41) == 'EXPECTED-7f3a'"], timeout=TIMEOUT)
    assert res.score == 0.0
    assert "f(41)" in res.stdout  # the dump works: it finds the expression it is asked for
    assert "EXPECTED-7f3a" not in res.stdout


def test_hostile_values_cannot_stall_or_bloat_the_checker() -> None:
    before = _maxrss_kib()
    start = time.monotonic()
    code = "def f(x):\n    return 10**12\n"
    tests = ["assert 'a' * f(1) == 'aaa'", "assert pow(3, f(2)) == 9", "assert [0] * f(3) == [0]"]
    res = run_tests_detailed(code, tests, timeout=TIMEOUT)
    assert res.score == 0.0
    assert time.monotonic() - start < 2 * TIMEOUT + 3
    assert _maxrss_kib() - before < 100 * 1024


# ---------------------------------------------------------------- the sandbox programs, run in this process
# sandbox_child.py and sandbox_checker.py run in fresh interpreters; their pure parts are checked here directly.


class _Two(enum.IntEnum):
    TWO = 2


_Point = collections.namedtuple("_Point", "x y")


def _round_trip(value: object) -> object:
    """A value as the checker receives it: encoded by the child, sent as JSON, decoded by the checker."""
    return sandbox_checker._decode(json.loads(json.dumps(sandbox_child._plain(value))))


def test_sandbox_programs_are_stdlib_only_modules_run_from_their_text() -> None:
    for module, source in ((sandbox_child, code_mod._CHILD_SOURCE), (sandbox_checker, code_mod._CHECKER_SOURCE)):
        assert module.__file__ is not None
        assert source == Path(module.__file__).read_text(encoding="utf-8")
        tree = ast.parse(source)
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert names and {name.split(".")[0] for name in names} <= sys.stdlib_module_names
        assert ast.unparse(tree.body[-1]) == "if __name__ == '__main__':\n    _main()"  # nothing runs on import


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (True, True),
        (-(2**100), -(2**100)),
        (_Two.TWO, 2),
        (0.1, 0.1),
        (-0.0, -0.0),
        (math.inf, math.inf),
        (math.nan, math.nan),
        (1 - 2.5j, 1 - 2.5j),
        ("é\n", "é\n"),
        (b"\x00\xff", b"\x00\xff"),
        (bytearray(b"ab"), bytearray(b"ab")),
        (_Point(1, 2), (1, 2)),
        (collections.Counter("aab"), {"a": 2, "b": 1}),
        ({(1, "x"): [frozenset({3}), {None}]}, {(1, "x"): [frozenset({3}), {None}]}),
    ],
)
def test_plain_values_cross_by_value_as_their_base_type(value: object, expected: object) -> None:
    decoded = _round_trip(value)
    assert type(decoded) is type(expected) and repr(decoded) == repr(expected)  # -0.0, nan and True included


def test_values_that_are_not_plain_data_are_refused() -> None:
    for value in (object(), len, (x for x in ()), [1, object()], {1: type}):
        with pytest.raises(TypeError, match="not plain data"):
            sandbox_child._plain(value)
    deep: list[object] = []
    for _ in range(150):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):
        sandbox_child._plain(deep)


@pytest.mark.parametrize(
    "raw",
    [[], ["?"], "i", ["i", 5], ["b", 1], ["s", "a", "b"], ["d", [["b", True]]], ["d", 1], ["f", "nope"], ["l", 3]],
)
def test_malformed_values_are_refused_by_the_checker(raw: object) -> None:
    with pytest.raises(ValueError):
        sandbox_checker._decode(raw)


def test_the_checker_refuses_values_nested_too_deeply() -> None:
    raw: list[object] = ["i", "1"]
    for _ in range(120):
        raw = ["l", raw]
    with pytest.raises(ValueError, match="nested"):
        sandbox_checker._decode(raw)


def test_syscall_tables_are_consistent() -> None:
    for table in (sandbox_child._X86_64, sandbox_child._AARCH64):
        assert set(sandbox_child._SPECIAL) <= set(table)
        assert len(set(table.values())) == len(table)  # no number listed under two names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_child_helpers_that_read_the_system(tmp_path: Path) -> None:
    assert sandbox_child._count_tasks(os.getuid()) >= 1  # type: ignore[operator]  # this process at least
    assert sandbox_child._world_accessible(["/"])
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert not sandbox_child._world_accessible([str(private)])
    rules = sandbox_child._rule_targets(str(tmp_path))
    try:
        assert rules[0][1:] == ("rw", True)  # the working directory first, writable
        assert {kind for _fd, kind, _is_dir in rules} == {"rw", "dev", "ro"}
    finally:
        for fd, _kind, _is_dir in rules:
            os.close(fd)


class _Exited(Exception):
    pass


def _exit(code: int) -> None:
    raise _Exited(code)


def _child_report(solution: str, tests: list[str], monkeypatch: pytest.MonkeyPatch) -> bytes:
    """What the child's `_run` writes on its result channel for `solution` and the primaries of `tests`."""
    plans = code_mod._plan_tests(tests)
    primaries = [(t, src, compile(src, f"<test {t}>", "eval")) for t, (_c, prims) in enumerate(plans) for src in prims]
    try:
        compiled = compile(solution, "<solution>", "exec")
    except SyntaxError:
        compiled = None
    monkeypatch.setitem(sys.modules, "__solution__", None)  # restored afterwards
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(_Exited):
            sandbox_child._run(compiled, primaries, write_fd, _exit=_exit)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as channel:
        return channel.read()


def _checker_verdicts(
    tests: list[str], data: bytes, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> list[str]:
    """The checker's output lines for `tests` over the result channel `data`, computed in this process."""
    payload = code_mod._checker_input(code_mod._plan_tests(tests), data, memory_mb=256, cpu_seconds=2)
    monkeypatch.setattr(sandbox_checker, "_limits", lambda cfg: None)  # not this process's limits
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(payload)))
    capfd.readouterr()
    sandbox_checker._main()
    return capfd.readouterr().out.splitlines()


def test_child_reports_values_and_checker_judges_them(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    solution = "def f(x):\n    return 2 * x\nraise ValueError('after f')\n"
    tests = [
        "assert f(2) == 4",
        "assert f(2) == 5",
        "assert f(None) == 0",
        "assert f is not None",
        "assert f(0) is None or sorted(f([3, 1])) == [1, 1, 3, 3]",
        "assert missing(1) == 1",
        "assert f('a') + 1 == 2",
    ]
    data = _child_report(solution, tests, monkeypatch)
    lines = data.decode().splitlines()
    assert lines[0] == "compiled" and lines[-1] == "done"
    doubled = '5 ["l",["i","3"],["i","1"],["i","3"],["i","1"]]'
    assert lines[1:-1] == ['0 ["i","4"]', '1 ["i","4"]', "2 !", "3 ?", '4 ["i","0"]', doubled, "6 !", '7 ["s","aa"]']
    stderr = capfd.readouterr().err
    assert "the solution raised: ValueError: after f" in stderr and "is not plain data" in stderr
    verdicts = _checker_verdicts(tests, data, monkeypatch, capfd)
    assert verdicts[0] == "0 1" and verdicts[4] == "4 1"
    assert verdicts[1] == "1 0 AssertionError"
    assert verdicts[2] == "2 0 f(None) raised"
    assert verdicts[3] == "3 0 f is not plain data"
    assert verdicts[5] == "5 0 missing(1) raised"
    assert verdicts[6] == '6 0 TypeError: can only concatenate str (not "int") to str'  # in the checker


def test_checker_without_a_compiled_solution_or_values(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    assert _child_report("def f(x) return", ["assert f(1) == 2"], monkeypatch) == b""
    assert "does not compile" in capfd.readouterr().err
    tests = ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 6", "assert f(4) == 8"]
    assert _checker_verdicts(tests, b"0 1\n", monkeypatch, capfd)[0].startswith("0 0 the solution does not compile")
    data = b'compiled\n0 ["i","2"]\n0 ["i","7"]\n1 ["i"]\n2 [1,\n'  # the first report of each value counts
    assert _checker_verdicts(tests, data, monkeypatch, capfd) == [
        "0 1",
        "1 0 f(2): unreadable value (ValueError)",
        "2 0 f(3): unreadable value (JSONDecodeError)",
        "3 0 f(4): no value (timed out, or the process ended first)",
    ]


# ---------------------------------------------------------------- test forms


def test_supported_test_forms() -> None:
    code = (
        "import math\n"
        "def f(x):\n    return 2 * x\n"
        "def pair(x):\n    return (x, [x, {x: {x}}])\n"
        "def boom(x):\n    raise ValueError(x)\n"
        "nan = float('nan')\n"
        "data = {'k': [1, 2, 3]}\n"
    )
    tests = [
        "assert math.isclose(f(1.05), 2.1, rel_tol=1e-9)",
        "assert abs(f(0.1) - 0.2) < 1e-12 and round(f(1.25), 1) == 2.5",
        "assert len(f([1, 2])) == 4 and sorted(f([3, 1])) == [1, 1, 3, 3]",
        "assert all(v % 2 == 0 for v in [f(1), f(2)]) and [v + 1 for v in f([1])] == [2, 2]",
        "assert pair(1) == (1, [1, {1: {1}}]) and type(pair(1)) is tuple",
        "assert f(b'a') == b'aa' and f('ab') == 'abab' and f(-0.0) == 0.0",
        "assert nan != nan and math.isnan(nan) and f(math.inf) == math.inf",
        "assert data['k'][1:] == [2, 3] and f(data['k'][0]) == 2",
        "assert f(2) == 4, 'message not evaluated: ' + boom(1)",
        "assert True or boom(1)",  # short-circuit: a value that is not needed may raise
        "assert f(1) == 2\nassert f(2) == 4",  # several asserts in one test: all must hold
        "assert f'{f(3)}' == '6' and str(f(3)) == '6' and isinstance(f(3), int)",
        "assert boom(1) == 1",  # raised: fails
        "assert list(map(f, [1, 2])) == [2, 4]",  # the function itself is not plain data: fails
        "assert f(1) == 3",  # fails
    ]
    res = run_tests_detailed(code, tests, timeout=TIMEOUT)
    assert (res.passed, res.total) == (len(tests) - 3, len(tests)), res.stderr
    assert "test 12 failed: boom(1) raised" in res.stderr
    assert "test 13 failed: f is not plain data" in res.stderr


@pytest.mark.parametrize(
    ("test", "message"),
    [
        ("x = f(2)\nassert x == 4", "test 0: only assert statements"),
        ("def check(c):\n    assert c(1) == 2\ncheck(f)", "only assert statements"),
        ("assert all(f(x) == 2 * x for x in range(3))", "comprehension or lambda variable"),
        ("assert sorted([1, 2], key=lambda v: f(v)) == [1, 2]", "comprehension or lambda variable"),
        ("assert (y := f(2)) == 4", "NamedExpr"),
        ("assert f(2) == ().__class__", "attribute '__class__'"),
        ("assert f(2 ==", "test 0 is not valid Python"),
        ("", "test 0 is empty"),
    ],
)
def test_unsupported_test_forms_raise(test: str, message: str) -> None:
    with pytest.raises(AlignRLError, match=message):
        run_tests(DOUBLE, [test], timeout=TIMEOUT)


# ---------------------------------------------------------------- code_reward


def test_extract_code() -> None:
    text = "Here:\n```python\ndef f():\n    return 1\n```\nand better:\n```py\ndef f():\n    return 2\n```\n"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nx = 1\n```\n```text\nnot code\n```") == "x = 1\n"
    assert extract_code("x = 3") == "x = 3"
    assert extract_code("```python\nx = 4\n") == "x = 4\n"  # truncated completion: unterminated fence
    assert extract_code([{"role": "assistant", "content": "```python\ny = 5\n```"}]) == "y = 5\n"


def test_code_reward_on_fenced_completions() -> None:
    completions = [
        "Sure!\n```python\n" + DOUBLE + "```",
        [{"role": "assistant", "content": "```python\ndef f(x):\n    return x + x\n```"}],
        "```python\ndef f(x):\n    return x\n```",
        "",
        "I cannot solve this.",
    ]
    tests = [
        DOUBLE_TESTS,
        DOUBLE_TESTS,
        '["assert f(0) == 0", "assert f(1) == 2"]',
        DOUBLE_TESTS,
        DOUBLE_TESTS,
    ]
    start = time.monotonic()
    rewards = code_reward(["p"] * 5, completions, [[1]] * 5, tests=tests)
    assert rewards == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    assert time.monotonic() - start < 20


def test_code_reward_column_errors() -> None:
    with pytest.raises(AlignRLError, match="one entry per completion"):
        code_reward(["p"], ["x = 1"], tests=[["assert True"], ["assert True"]])
    with pytest.raises(AlignRLError, match="sample 0"):
        code_reward(["p"], ["x = 1"], tests=[[]])
    with pytest.raises(AlignRLError, match="sample 1: test 0: only assert statements"):
        code_reward(["p", "p"], ["x = 1", "x = 1"], tests=[["assert x == 1"], ["x = 2"]])


def test_columns_cannot_set_sandbox_limits() -> None:
    slow = "```python\nimport time\ntime.sleep(3)\n" + DOUBLE + "```"
    quick = "```python\n" + DOUBLE + "```"
    reward = make_code_reward(timeout=1.0)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="ignoring column 'timeout'"):
        rewards = reward(["p"] * 2, [slow, quick], [[1]] * 2, tests=[DOUBLE_TESTS] * 2, timeout=[60.0, 60.0])
    assert rewards == [0.0, 1.0]  # the slow one still timed out after the reward's own 1 s
    assert time.monotonic() - start < 6
    with pytest.warns(UserWarning, match="ignoring column 'timeout'"):  # nor can a column shorten it
        assert code_reward(["p"], [quick], [[1]], tests=[DOUBLE_TESTS], timeout=[1e-6]) == [1.0]
    with pytest.warns(UserWarning, match="memory_mb"):
        assert code_reward(["p"], [quick], [[1]], tests=[DOUBLE_TESTS], memory_mb=[1]) == [1.0]
    assert code_reward(["p"], [quick], [[1]], tests=[DOUBLE_TESTS], answer=["unused"]) == [1.0]
    assert required_columns(code_reward) == ["tests"] and required_columns(reward) == ["tests"]
    with pytest.raises(AlignRLError, match="timeout"):
        make_code_reward(timeout=0)
