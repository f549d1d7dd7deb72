"""Sandboxed code-execution reward: run a candidate program against assert-style tests in a child process.

Each run starts a fresh ``python -B -s -S -P`` child (stdlib only, no site-packages) in a new session and an
empty private working directory, deleted afterwards. The child first runs the candidate code (an exception
at its top level is reported but does not stop the tests: what it defined before failing stays defined),
then each test statement separately. Tests that did not finish before the timeout count as failed; the
timeout includes interpreter start-up (~50 ms). Protection layers, outermost first; the child reports which
ones it installed in ``SandboxResult.layers``:

Hard guarantees (enforced by the kernel):

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

Defence in depth (in-process: code running inside the interpreter can in principle subvert it):

7. ``audit-hook``: a PEP 578 audit hook, installed before the candidate runs, blocks writes and deletions
   outside the working directory, reads of other processes' /proc entries, os.system/exec/spawn/fork,
   subprocess, sockets (``socket.socket`` is replaced too), importing ctypes, gc and thread-frame
   introspection, sub-interpreters, setrlimit, chmod/chown and signals to other processes.

Results come back on a dedicated pipe, one line per test prefixed by a random nonce that is never in the
candidate's namespace, environment, argv or files, so printing or writing a fake result does not count.

Known limits: the candidate shares the interpreter with the tests, so it can game equality checks (an
object whose ``__eq__`` always returns True) or find the nonce through deliberate frame introspection; disk
use inside the working directory is bounded per file but not in total; without seccomp, a root caller's
child is not bound by RLIMIT_NPROC and processes that leave the process group survive the final SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from alignrl.errors import AlignRLError
from alignrl.rewards.math import completion_text

__all__ = [
    "SandboxResult",
    "code_reward",
    "extract_code",
    "parse_tests",
    "run_tests",
    "run_tests_detailed",
]

_OUTPUT_CAP = 64 * 1024  # bytes of stdout/stderr read back
_FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: any file the child writes, stdout/stderr included
_RESULT_CAP = 1024 * 1024  # bytes of the result channel kept
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


def _run(solution, tests, ok_lines, fail_lines, done_line, result_fd, _exec=exec, _write=os.write,
         _base=BaseException, _exit=os._exit, _range=range, _len=len):
    import builtins
    import types
    module = types.ModuleType("__solution__")
    module.__builtins__ = builtins
    sys.modules["__solution__"] = module
    namespace = module.__dict__
    if solution is None:
        _note(_write, "the solution does not compile")
    else:
        try:
            _exec(solution, namespace)
        except _base as exc:
            _note(_write, "the solution raised", exc)
    for i in _range(_len(tests)):
        ok = False
        if solution is not None and tests[i] is None:
            _note(_write, "test %d does not compile" % i)
        elif solution is not None:
            try:
                _exec(tests[i], namespace)
                ok = True
            except _base as exc:
                _note(_write, "test %d failed" % i, exc)
        try:
            _write(result_fd, ok_lines[i] if ok else fail_lines[i])
        except _base:
            pass
    try:
        _write(result_fd, done_line)
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
    nonce = cfg.pop("nonce").encode()
    code, tests = cfg.pop("code"), cfg.pop("tests")
    ok_lines = [nonce + b" %d 1\n" % i for i in range(len(tests))]
    fail_lines = [nonce + b" %d 0\n" % i for i in range(len(tests))]
    done_line = nonce + b" done\n"
    layers = _harden(cfg)
    os.write(result_fd, nonce + b" layers " + ",".join(layers).encode() + b"\n")
    del nonce
    builtins.exit = builtins.quit = sys.exit  # normally provided by site, which -S skips
    try:
        solution = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        solution = None
    compiled = []
    for i, test in enumerate(tests):
        try:
            compiled.append(compile(test, "<test %d>" % i, "exec"))
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            compiled.append(None)
    del code, tests
    _run(solution, compiled, ok_lines, fail_lines, done_line, result_fd)


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


def _parse_results(data: bytes, nonce: str, total: int) -> tuple[int, tuple[str, ...]]:
    """Count passed tests from nonce-prefixed result lines; the first line per test wins."""
    prefix = nonce.encode() + b" "
    seen: set[int] = set()
    passed = 0
    layers: tuple[str, ...] = ()
    for line in data.split(b"\n"):
        if not line.startswith(prefix):
            continue
        rest = line[len(prefix) :]
        if rest.startswith(b"layers "):
            if not layers:
                layers = tuple(x for x in rest[7:].decode("ascii", "replace").split(",") if x)
            continue
        parts = rest.split(b" ")
        if len(parts) != 2 or not parts[0].isdigit() or parts[1] not in (b"0", b"1"):
            continue
        index = int(parts[0])
        if index < total and index not in seen:
            seen.add(index)
            passed += parts[1] == b"1"
    return passed, layers


def _run_sandboxed(
    code: str,
    tests: list[str],
    *,
    timeout: float,
    memory_mb: int,
    cpu_seconds: int,
    disable: Sequence[str] = (),
) -> SandboxResult:
    """Run `code` then each test in a hardened child; `disable` (testing only) skips named optional layers."""
    nonce = secrets.token_hex(16)
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
                "nonce": nonce,
                "code": code,
                "tests": tests,
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
        passed, layers = _parse_results(data, nonce, len(tests))
        if not layers and not timed_out:  # the harness died before the candidate ran: not its fault
            lines = _read_head(err_path, _OUTPUT_CAP).strip().splitlines() or [f"exit code {proc.returncode}"]
            raise AlignRLError(f"the code sandbox failed to start (memory_mb too small?): {lines[-1][:300]}")
        return SandboxResult(
            passed=passed,
            total=len(tests),
            timed_out=timed_out,
            exit_code=proc.returncode,
            stdout=_read_head(out_path, _OUTPUT_CAP),
            stderr=_read_head(err_path, _OUTPUT_CAP),
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


def code_reward(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    *,
    tests: list[Any],
    timeout: float = 5.0,
    **kwargs: Any,
) -> list[float]:
    """Fraction of each sample's tests passed by the code in its completion, run in the sandbox."""
    _check_platform()
    cpu = _validate_limits(timeout, 512, None)
    if isinstance(tests, str) or len(tests) != len(completions):
        got = "a string" if isinstance(tests, str) else f"{len(tests)} entries"
        raise AlignRLError(f"column 'tests' needs one entry per completion: {got} for {len(completions)}")
    test_lists: list[list[str]] = []
    for i, sample_tests in enumerate(tests):
        try:
            test_lists.append(parse_tests(sample_tests))
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
                _run_sandboxed, codes[i], test_lists[i], timeout=timeout, memory_mb=512, cpu_seconds=cpu
            )
            for i in todo
        }
        for i, future in futures.items():
            rewards[i] = future.result().score
    return rewards
