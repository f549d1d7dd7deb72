"""Sandboxed code-execution reward: run a candidate program against assert tests, with a verdict it cannot forge.

Tests are `assert EXPR[, message]` statements (one or more per test; a test passes when all of its asserts hold).
The caller parses each one (`ast`) and splits EXPR into *primaries*, the outermost call/attribute/subscript chains
that use a name of the solution (`f(3)`, `obj.m(2)[0]`, `ok`), and the rest (literals, comparisons, operators,
displays, comprehensions, and calls of a fixed set of builtins and `math`: `sorted(f(3)) == [1, 2]`,
`math.isclose(f(1), 0.5)`). Other statements, and primaries that use a comprehension or lambda variable of the
test (`all(f(x) == 2 * x for x in ...)`), raise AlignRLError. The message of an assert is never evaluated.

Each run then takes two fresh interpreters, one after the other:

- the candidate's process (`python -B -s -S -P`, stdlib only) in a new session and an empty private working
  directory, deleted afterwards. It is sent the solution and the primaries' source only: never a test, an
  expected value or a verdict. It runs the solution (an exception at its top level is reported but what it
  defined before failing stays defined), evaluates each primary in the solution's namespace and reports its value
  as plain data (None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset;
  subclasses are converted to the base type, by value; anything else is "not plain data") on a pipe. Whatever
  code there does (walk frames, patch the harness, write to the pipe, exit early), it can at most choose these
  values, which is what returning an answer does.
- the checker (`python -I -S -B`), started only after the candidate's whole process group has been killed: it
  runs no candidate code. It decodes the reported values and evaluates each test's expression over them, with
  only the builtins of `_SAFE_BUILTINS` and `math`, under its own CPU, memory and wall-clock limits (`timeout`
  again). A primary that raised, timed out or was not plain data fails the test only if the test needed its value
  (`x is None or f(x) == 1` short-circuits as usual); every primary is evaluated once, in source order.

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
# Program run by the child interpreter. It reads its configuration (nonce, code, tests, limits) from stdin,
# hardens itself, then runs the candidate and the tests. Stdlib only: the child runs with -S.
# ----------------------------------------------------------------------------------------------------------
_CHILD_SOURCE = r"""
import os
import sys

_X86_64 = {
    "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone": 56, "clone3": 435, "ptrace": 101,
    "socket": 41, "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "prlimit64": 302, "setrlimit": 160, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "unshare": 272, "setns": 308, "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
    "request_key": 249, "userfaultfd": 323, "process_vm_readv": 310, "process_vm_writev": 311,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169, "swapon": 167,
    "swapoff": 168, "acct": 163, "iopl": 172, "ioperm": 173, "quotactl": 179, "quotactl_fd": 443,
    "settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305, "sethostname": 170,
    "setdomainname": 171, "syslog": 103, "mknod": 133, "mknodat": 259, "vhangup": 153, "fanotify_init": 300,
    "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144, "sched_setaffinity": 203,
    "sched_setattr": 314, "ioprio_set": 251, "migrate_pages": 256, "move_pages": 279, "kcmp": 312,
    "process_madvise": 440, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94,
    "fchownat": 260, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199, "setxattrat": 463, "removexattrat": 466, "utime": 132,
    "utimes": 235, "futimesat": 261, "utimensat": 280, "capset": 126, "lookup_dcookie": 212, "uselib": 134,
}
_AARCH64 = {
    "execve": 221, "execveat": 281, "clone": 220, "clone3": 435, "ptrace": 117, "socket": 198, "kill": 129,
    "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "prlimit64": 261,
    "setrlimit": 164, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
    "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217, "request_key": 218, "userfaultfd": 282,
    "process_vm_readv": 270, "process_vm_writev": 271, "open_by_handle_at": 265, "name_to_handle_at": 264,
    "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294,
    "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89, "quotactl": 60, "quotactl_fd": 443,
    "settimeofday": 170, "clock_settime": 112, "adjtimex": 171, "clock_adjtime": 266, "sethostname": 161,
    "setdomainname": 162, "syslog": 116, "mknodat": 33, "vhangup": 58, "fanotify_init": 262,
    "setpriority": 140, "sched_setparam": 118, "sched_setscheduler": 119, "sched_setaffinity": 122,
    "sched_setattr": 274, "ioprio_set": 30, "migrate_pages": 238, "move_pages": 239, "kcmp": 272,
    "process_madvise": 440, "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "fchown": 55, "fchownat": 54, "setxattr": 5,
    "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16,
    "setxattrat": 463, "removexattrat": 466, "utimensat": 88, "capset": 91, "lookup_dcookie": 18,
}
# Checked separately (argument filters) rather than denied outright.
_SPECIAL = ("clone", "clone3", "kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64")


def _read_stdin():
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    return b"".join(chunks)


def _load_libc():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.prctl.restype = ctypes.c_int
        return ctypes, libc
    except Exception:
        return None, None


def _syscall(ctypes, libc, nr, *args):
    conv = [a if not isinstance(a, int) else ctypes.c_long(a) for a in args]
    return libc.syscall(ctypes.c_long(nr), *conv)


def _unshare_net(ctypes, libc, layers):
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    if libc.unshare(clone_newnet) == 0:
        layers.append("netns")
        return
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(clone_newuser | clone_newnet) != 0:
        return
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (uid, uid)),
                       ("/proc/self/gid_map", "%d %d 1" % (gid, gid))):
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError:
            pass
    layers.append("userns+netns")


def _rule_targets(workdir):
    import stat
    ro = ["/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom",
          "/dev/random", "/dev/zero", "/sys/devices/system/cpu", "/proc/self",
          os.path.join(sys.base_prefix, "lib"), os.path.join(sys.prefix, "lib")]
    ro += [p for p in sys.path if p]
    targets = [(workdir, "rw"), ("/dev/null", "dev")] + [(p, "ro") for p in ro]
    opened = []
    for path, kind in targets:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except (OSError, AttributeError):
            continue
        opened.append((fd, kind, stat.S_ISDIR(os.fstat(fd).st_mode)))
    return opened


def _set_limit(name, soft, hard=None):
    import resource
    res = getattr(resource, name, None)
    if res is None:
        return False
    hard = soft if hard is None else hard
    try:
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        resource.setrlimit(res, (soft, hard))
        return True
    except (ValueError, OSError):
        return False


def _count_tasks(uid):
    count = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if name.isdigit():
            try:
                if os.stat("/proc/" + name).st_uid == uid:
                    count += len(os.listdir("/proc/%s/task" % name))
            except OSError:
                pass
    return count


def _world_accessible(paths):
    for path in paths:
        try:
            if os.stat(path).st_mode & 0o005 != 0o005:
                return False
            parent = os.path.dirname(path)
            while True:
                if not os.stat(parent).st_mode & 0o001:
                    return False
                if parent in ("/", ""):
                    break
                parent = os.path.dirname(parent)
        except OSError:
            return False
    return True


def _drop_caps(ctypes, libc):
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    return libc.capset(header, data) == 0


def _landlock(ctypes, libc, rules, layers):
    import struct
    abi = _syscall(ctypes, libc, 444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return
    execute, write_file, read_file, read_dir = 1, 2, 4, 8
    make_char, make_block, truncate, ioctl_dev = 1 << 6, 1 << 11, 1 << 14, 1 << 15
    handled = (1 << 13) - 1
    if abi >= 2:
        handled |= 1 << 13
    if abi >= 3:
        handled |= truncate
    if abi >= 5:
        handled |= ioctl_dev
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP: no rules, so both denied
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = ctypes.create_string_buffer(struct.pack("QQQ", handled, net, scoped)[:size], size)
    ruleset = _syscall(ctypes, libc, 444, attr, size, 0)
    if ruleset < 0:
        return
    file_rights = execute | write_file | read_file | truncate | ioctl_dev
    try:
        for fd, kind, is_dir in rules:
            if kind == "rw":
                allowed = handled & ~(execute | make_char | make_block)
            elif kind == "dev":
                allowed = read_file | write_file | truncate
            else:
                allowed = read_file | read_dir
            allowed &= handled
            if not is_dir:
                allowed &= file_rights
            rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, fd), 12)
            _syscall(ctypes, libc, 445, ruleset, 1, rule, 0)  # LANDLOCK_RULE_PATH_BENEATH
        libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        if _syscall(ctypes, libc, 446, ruleset, 0) == 0:
            layers.append("landlock-abi%d" % abi)
    finally:
        os.close(ruleset)


def _seccomp(ctypes, libc, layers):
    import struct
    machine = os.uname().machine
    if machine == "x86_64":
        arch, table = 0xC000003E, _X86_64
    elif machine in ("aarch64", "arm64"):
        arch, table = 0xC00000B7, _AARCH64
    else:
        return False
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    pid = os.getpid()

    def arg(i, high=False):
        return 16 + 8 * i + (4 if high else 0)

    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    if arch == 0xC000003E:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 ABI

    def block(nr, body):
        prog.append((jeq, 0, len(body), nr))
        prog.extend(body)

    def first_arg_in(nr, values):
        n = len(values)
        body = [(ld, 0, 0, arg(0))] + [(jeq, n - j, 0, v) for j, v in enumerate(values)]
        block(nr, body + [(ret, 0, 0, eperm), (ret, 0, 0, allow)])

    clone_thread = 0x00010000
    block(table["clone"], [(ld, 0, 0, arg(0)), (jset, 0, 1, clone_thread), (ret, 0, 0, allow),
                           (ret, 0, 0, eperm)])
    block(table["clone3"], [(ret, 0, 0, enosys)])  # glibc then falls back to clone() for threads
    first_arg_in(table["kill"], [pid, 0])
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        first_arg_in(table[name], [pid])
    block(table["prlimit64"], [  # allowed only as a getter on this process
        (ld, 0, 0, arg(0)), (jeq, 1, 0, 0), (jeq, 0, 5, pid),
        (ld, 0, 0, arg(2)), (jeq, 0, 3, 0), (ld, 0, 0, arg(2, True)), (jeq, 0, 1, 0),
        (ret, 0, 0, allow), (ret, 0, 0, eperm)])
    for name, nr in table.items():
        if name not in _SPECIAL:
            block(nr, [(ret, 0, 0, eperm)])
    prog.append((ret, 0, 0, allow))
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0:
        layers.append("seccomp")
        return True
    return False


def _install_audit_hook(workdir, allow_unix_sockets):
    import posixpath
    import socket as socket_module

    realpath, join, dirname = posixpath.realpath, posixpath.join, posixpath.dirname
    fsdecode, getcwd = os.fsdecode, os.getcwd
    work = realpath(workdir)
    pid = os.getpid()
    own_proc = "/proc/%d" % pid
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    af_unix = getattr(socket_module, "AF_UNIX", 1)
    blocked = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
        "os.killpg", "subprocess.Popen", "pty.spawn", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys._current_frames", "sys._current_exceptions",
        "cpython.PyInterpreterState_New",
        "resource.setrlimit", "os.chmod", "os.chown", "os.chflags", "os.lchflags", "os.setxattr",
        "os.removexattr", "os.utime",
    ))
    # event -> (indices of path arguments, indices of dir_fd arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.truncate": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
    }
    blocked_imports = ("ctypes", "_ctypes", "_xxsubinterpreters")

    def resolve(path, base=None):
        path = fsdecode(path)
        if base is not None and not path.startswith("/"):
            path = join(base, path)
        return realpath(path)

    def inside(resolved):
        return resolved == work or resolved.startswith(work + "/")

    def inside_proc(resolved):
        return resolved == own_proc or resolved.startswith(own_proc + "/")

    def deny(what):
        raise PermissionError("sandbox: %s is not allowed" % what)

    def hook(event, args):
        if event == "open":
            path, _mode, flags = args
            if path is None or isinstance(path, int):
                return
            resolved = resolve(path)
            if flags & write_flags:
                if not (inside(resolved) or resolved == "/dev/null"):
                    deny("writing " + resolved)
            elif resolved.startswith("/proc/") and not inside_proc(resolved):
                deny("reading " + resolved)
            return
        if event in blocked:
            deny(event)
        if event.startswith("socket."):
            if event == "socket.__new__" and allow_unix_sockets and args[1] == af_unix:
                return
            deny("network access (%s)" % event)
        if event.startswith("ctypes."):
            deny(event)
        if event == "import":
            name = args[0]
            if name in blocked_imports or name.startswith("ctypes."):
                deny("importing " + name)
            return
        if event == "os.kill":
            if args[0] not in (pid, 0):
                deny("signalling another process")
            return
        if event == "resource.prlimit":
            if args[0] not in (pid, 0) or (len(args) > 2 and args[2] is not None):
                deny("changing resource limits")
            return
        spec = path_events.get(event)
        if spec is not None:
            paths, dir_fds = spec
            for i in dir_fds:
                if i < len(args) and args[i] not in (None, -1, -100):  # -1/AT_FDCWD: no dir_fd given
                    deny(event + " with dir_fd")
            for i in paths:
                if i >= len(args):
                    continue
                if isinstance(args[i], int):
                    if event != "os.truncate":
                        deny(event + " on a file descriptor")
                    continue
                if not inside(resolve(args[i])):
                    deny("%s outside the working directory" % event)
            if event == "os.symlink":
                target = resolve(args[0], dirname(resolve(args[1], getcwd())))
                if not inside(target):
                    deny("a symlink pointing outside the working directory")

    sys.addaudithook(hook)
    real_socket = socket_module.socket

    class _SandboxSocket(real_socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if not (allow_unix_sockets and family == af_unix):
                raise PermissionError("sandbox: network access is not allowed")
            super().__init__(family, type, proto, fileno)

    socket_module.socket = socket_module.SocketType = _SandboxSocket
    for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
        del sys.modules[name]


def _harden(cfg):
    layers = ["rlimits"]
    workdir = cfg["workdir"]
    linux = sys.platform.startswith("linux")
    ctypes, libc = _load_libc() if linux else (None, None)
    disabled = set(cfg.get("disable", ()))
    if libc is not None and "netns" not in disabled:
        _unshare_net(ctypes, libc, layers)
    rules = _rule_targets(workdir) if libc is not None else []
    import signal
    _set_limit("RLIMIT_AS", cfg["memory_bytes"])
    _set_limit("RLIMIT_CPU", cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
    _set_limit("RLIMIT_FSIZE", cfg["fsize"])
    _set_limit("RLIMIT_NOFILE", cfg["nofile"])
    _set_limit("RLIMIT_CORE", 0)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes fail with EFBIG instead of killing
    drop = cfg.get("drop")
    if os.geteuid() == 0:
        stdlib = [p for p in sys.path if p and os.path.isdir(p)]
        if drop and _world_accessible(stdlib):
            os.setgroups([])
            if hasattr(os, "setresuid"):
                os.setresgid(drop[1], drop[1], drop[1])
                os.setresuid(drop[0], drop[0], drop[0])
            else:
                os.setgid(drop[1])
                os.setuid(drop[0])
            layers.append("uid:nobody")
            _set_limit("RLIMIT_NPROC", 64)
        else:
            try:
                os.chown(workdir, 0, 0)
            except OSError:
                pass
            if libc is not None and _drop_caps(ctypes, libc):
                layers.append("nocaps")
    elif linux:
        tasks = _count_tasks(os.getuid())
        if tasks is not None:
            _set_limit("RLIMIT_NPROC", tasks + 64)
    seccomp = False
    if libc is not None:
        if "landlock" not in disabled:
            try:
                _landlock(ctypes, libc, rules, layers)
            except Exception:
                pass
        if "seccomp" not in disabled:
            try:
                seccomp = _seccomp(ctypes, libc, layers)
            except Exception:
                seccomp = False
    for fd, _, _ in rules:
        os.close(fd)
    if "audit-hook" not in disabled:
        _install_audit_hook(workdir, allow_unix_sockets=seccomp)
        layers.append("audit-hook")
    return layers


def _note(write, message, exc=None):
    try:
        if exc is not None:
            message += ": %s: %s" % (type(exc).__name__, str(exc)[:200])
        write(2, ("[sandbox] " + message + "\n").encode("utf-8", "replace"))
    except BaseException:
        pass


def _plain(value, depth=0):
    # A value as tagged JSON-ready data, by value: only the types below (and their subclasses, converted to the
    # base type) cross to the checker; anything else is not plain data and fails the test that needs it.
    if depth > 100:
        raise ValueError("nested more than 100 levels deep")
    kind = type(value)
    if value is None:
        return None
    if kind is bool:
        return ["b", value]
    if issubclass(kind, int):
        return ["i", int.__format__(value, "x")]
    if issubclass(kind, float):
        return ["f", float.hex(value)]
    if issubclass(kind, complex):
        value = complex(value)
        return ["c", float.hex(value.real), float.hex(value.imag)]
    if issubclass(kind, str):
        return ["s", str.__str__(value)]
    if issubclass(kind, bytes):
        return ["y", bytes.hex(value)]
    if issubclass(kind, bytearray):
        return ["Y", bytearray.hex(value)]
    if issubclass(kind, dict):
        return ["d"] + [[_plain(k, depth + 1), _plain(v, depth + 1)] for k, v in dict.items(value)]
    for base, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
        if issubclass(kind, base):
            return [tag] + [_plain(item, depth + 1) for item in value]
    raise TypeError("a value of type %s is not plain data" % kind.__name__)


def _write_all(fd, data, _write=os.write):
    view = memoryview(data)
    while view:
        view = view[_write(fd, view):]


def _run(solution, primaries, result_fd, _exec=exec, _eval=eval, _write_all=_write_all, _plain=_plain,
         _base=BaseException, _exit=os._exit, _len=len, _range=range):
    # Runs the candidate, then evaluates each primary (a sub-expression of a test that needs the candidate's
    # names) and reports its value as plain data. This process never sees a test, an expected value or a
    # verdict: whatever the candidate does here, it can at most choose the values it reports.
    import builtins
    import json
    import types
    dumps = json.dumps
    module = types.ModuleType("__solution__")
    module.__builtins__ = builtins
    sys.modules["__solution__"] = module
    namespace = module.__dict__
    if solution is None:
        _note(os.write, "the solution does not compile")
        _exit(0)
    _write_all(result_fd, b"compiled\n")
    try:
        _exec(solution, namespace)
    except _base as exc:
        _note(os.write, "the solution raised", exc)
    for i in _range(_len(primaries)):
        test, source, code = primaries[i]
        try:
            value = _eval(code, namespace)
        except _base as exc:
            _note(os.write, "test %d: %s raised" % (test, source[:200]), exc)
            line = b"%d !\n" % i
        else:
            try:
                line = b"%d " % i + dumps(_plain(value), separators=(",", ":")).encode("ascii") + b"\n"
            except _base as exc:
                _note(os.write, "test %d: the value of %s is not plain data" % (test, source[:200]), exc)
                line = b"%d ?\n" % i
        try:
            _write_all(result_fd, line)
        except _base:
            pass
    try:
        _write_all(result_fd, b"done\n")
    except _base:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _base:
            pass
    _exit(0)


def _main():
    import builtins
    import json
    cfg = json.loads(_read_stdin())
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    result_fd = cfg["result_fd"]
    if result_fd != 3:
        os.dup2(result_fd, 3)
        os.close(result_fd)
        result_fd = 3
    code, primaries = cfg.pop("code"), cfg.pop("primaries")
    layers = _harden(cfg)
    os.write(result_fd, b"layers " + ",".join(layers).encode() + b"\n")
    builtins.exit = builtins.quit = sys.exit  # normally provided by site, which -S skips
    try:
        solution = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        solution = None
    compiled = []
    for test, source in primaries:
        compiled.append((test, source, compile(source, "<test %d>" % test, "eval")))
    del code, primaries
    _run(solution, compiled, result_fd)


_main()
"""


# ----------------------------------------------------------------------------------------------------------
# Program run by the checker interpreter, started only after the candidate's process group has been killed.
# It runs no candidate code: it decodes the plain values the candidate's process reported for each primary
# and evaluates every test's assert expression over them, with a fixed set of builtins and `math`. Its stdin
# is one JSON header line (from the caller) followed by the raw bytes of the candidate's result channel.
# ----------------------------------------------------------------------------------------------------------
_CHECKER_SOURCE = r"""
import json
import math
import sys


def _limits(cfg):
    import resource
    for name, value in (("RLIMIT_AS", cfg["memory_bytes"]), ("RLIMIT_CPU", cfg["cpu_seconds"]),
                        ("RLIMIT_FSIZE", 1 << 20), ("RLIMIT_NOFILE", 16), ("RLIMIT_CORE", 0)):
        res = getattr(resource, name, None)
        if res is None:
            continue
        try:
            _, hard = resource.getrlimit(res)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass


class _NoValue(Exception):
    pass


def _text(x):
    if type(x) is not str:
        raise ValueError("malformed value")
    return x


def _decode(x, depth=0):
    if depth > 101:
        raise ValueError("nested too deeply")
    if x is None:
        return None
    if type(x) is not list or not x:
        raise ValueError("malformed value")
    tag, args = x[0], x[1:]
    if tag == "b" and len(args) == 1 and type(args[0]) is bool:
        return args[0]
    if tag == "i" and len(args) == 1:
        return int(_text(args[0]), 16)
    if tag == "f" and len(args) == 1:
        return float.fromhex(_text(args[0]))
    if tag == "c" and len(args) == 2:
        return complex(float.fromhex(_text(args[0])), float.fromhex(_text(args[1])))
    if tag == "s" and len(args) == 1:
        return _text(args[0])
    if tag == "y" and len(args) == 1:
        return bytes.fromhex(_text(args[0]))
    if tag == "Y" and len(args) == 1:
        return bytearray.fromhex(_text(args[0]))
    if tag in ("l", "t", "S", "F"):
        items = [_decode(item, depth + 1) for item in args]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d":
        out = {}
        for pair in args:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed value")
            out[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
        return out
    raise ValueError("malformed value")


def _main():
    import builtins
    data = sys.stdin.buffer.read()
    header, _, raw = data.partition(b"\n")
    cfg = json.loads(header)
    _limits(cfg)
    safe = {name: getattr(builtins, name) for name in cfg["safe"]}
    sources = cfg["primaries"]
    reports = {}
    compiled = False
    for line in raw.split(b"\n"):
        if line == b"compiled":
            compiled = True
            continue
        head, sep, rest = line.partition(b" ")
        if sep and 0 < len(head) < 10 and head.isdigit():
            i = int(head)
            if i < len(sources) and i not in reports:
                reports[i] = rest  # the first report of each primary counts
    del data, raw
    out = sys.stdout
    for t, (checks, offset) in enumerate(cfg["tests"]):
        reason = None
        if not compiled:
            reason = "the solution does not compile, or its process did not start"
        else:
            cache = {}

            def value(k, offset=offset, cache=cache):
                if k in cache:
                    return cache[k]
                i = offset + k
                rest = reports.get(i)
                if rest is None:
                    raise _NoValue("%s: no value (timed out, or the process ended first)" % sources[i])
                if rest == b"!":
                    raise _NoValue("%s raised" % sources[i])
                if rest == b"?":
                    raise _NoValue("%s is not plain data" % sources[i])
                try:
                    cache[k] = _decode(json.loads(rest))
                except Exception as exc:
                    raise _NoValue("%s: unreadable value (%s)" % (sources[i], type(exc).__name__))
                return cache[k]

            env = {"__builtins__": safe, "math": math, "_p": value}
            try:
                for source in checks:
                    if not eval(compile(source, "<test %d>" % t, "eval"), env):
                        reason = "AssertionError"
                        break
            except _NoValue as exc:
                reason = str(exc)
            except BaseException as exc:
                try:
                    reason = "%s: %s" % (type(exc).__name__, str(exc)[:200])
                except BaseException:
                    reason = type(exc).__name__
        if reason is None:
            out.write("%d 1\n" % t)
        else:
            out.write("%d 0 %s\n" % (t, " ".join(reason.split())[:300]))
        out.flush()


_main()
"""


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
    payload = json.dumps(header).encode() + b"\n" + data
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
