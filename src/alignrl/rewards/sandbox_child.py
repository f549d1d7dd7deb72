"""The candidate's side of the code sandbox: a stand-alone program, run by `alignrl.rewards.code`.

The parent reads this file's text once, when `alignrl.rewards.code` is imported, and starts it as
``python -B -s -S [-P] -c <this text>`` in the sandbox's empty working directory, so the sandbox is the same as
with an inline string: the child never opens this file and imports nothing from alignrl (its ``sys.path`` holds
the stdlib only), and nothing the candidate does to the file can change the program of a run.

It reads its configuration (JSON: the solution, the primaries' source, the working directory, the result pipe's
descriptor, the limits) from stdin, hardens itself (network namespace, rlimits, uid or capabilities, landlock,
seccomp, an audit hook), runs the candidate's solution, then reports the value of each primary as plain data on the
result pipe: never a test, an expected value or a verdict (those stay with `sandbox_checker`). See docs/security.md.

Stdlib only (the child runs with -S), and no side effects on import: the program runs only as ``__main__``, so the
pure helpers (`_plain`, the syscall tables, ...) can be imported and tested directly.
"""

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
}  # fmt: skip
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
}  # fmt: skip
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
    for path, text in (
        ("/proc/self/setgroups", "deny"),
        ("/proc/self/uid_map", f"{uid} {uid} 1"),
        ("/proc/self/gid_map", f"{gid} {gid} 1"),
    ):
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
          os.path.join(sys.base_prefix, "lib"), os.path.join(sys.prefix, "lib")]  # fmt: skip
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
                    count += len(os.listdir(f"/proc/{name}/task"))
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
            layers.append(f"landlock-abi{abi}")
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
    block(table["clone"], [(ld, 0, 0, arg(0)), (jset, 0, 1, clone_thread), (ret, 0, 0, allow), (ret, 0, 0, eperm)])
    block(table["clone3"], [(ret, 0, 0, enosys)])  # glibc then falls back to clone() for threads
    first_arg_in(table["kill"], [pid, 0])
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        first_arg_in(table[name], [pid])
    block(table["prlimit64"], [  # allowed only as a getter on this process
        (ld, 0, 0, arg(0)), (jeq, 1, 0, 0), (jeq, 0, 5, pid),
        (ld, 0, 0, arg(2)), (jeq, 0, 3, 0), (ld, 0, 0, arg(2, True)), (jeq, 0, 1, 0),
        (ret, 0, 0, allow), (ret, 0, 0, eperm)])  # fmt: skip
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
    own_proc = f"/proc/{pid}"
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    af_unix = getattr(socket_module, "AF_UNIX", 1)
    blocked = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
        "os.killpg", "subprocess.Popen", "pty.spawn", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys._current_frames", "sys._current_exceptions",
        "cpython.PyInterpreterState_New",
        "resource.setrlimit", "os.chmod", "os.chown", "os.chflags", "os.lchflags", "os.setxattr",
        "os.removexattr", "os.utime",
    ))  # fmt: skip
    # event -> (indices of path arguments, indices of dir_fd arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.truncate": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
    }  # fmt: skip
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
        raise PermissionError(f"sandbox: {what} is not allowed")

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
            deny(f"network access ({event})")
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
                    deny(f"{event} outside the working directory")
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
            message += f": {type(exc).__name__}: {str(exc)[:200]}"
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
    raise TypeError(f"a value of type {kind.__name__} is not plain data")


def _write_all(fd, data, _write=os.write):
    view = memoryview(data)
    while view:
        view = view[_write(fd, view) :]


def _run(
    solution,
    primaries,
    result_fd,
    _exec=exec,
    _eval=eval,
    _write_all=_write_all,
    _plain=_plain,
    _base=BaseException,
    _exit=os._exit,
    _len=len,
    _range=range,
):
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
            _note(os.write, f"test {test}: {source[:200]} raised", exc)
            line = b"%d !\n" % i
        else:
            try:
                line = b"%d " % i + dumps(_plain(value), separators=(",", ":")).encode("ascii") + b"\n"
            except _base as exc:
                _note(os.write, f"test {test}: the value of {source[:200]} is not plain data", exc)
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
        compiled.append((test, source, compile(source, f"<test {test}>", "eval")))
    del code, primaries
    _run(solution, compiled, result_fd)


if __name__ == "__main__":
    _main()
