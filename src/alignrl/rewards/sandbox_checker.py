"""The checker of the code sandbox: a stand-alone program, run by `alignrl.rewards.code`.

It is started only after the candidate's process group has been killed and runs no candidate code: it decodes the
plain values the candidate's process reported for each primary and evaluates every test's assert expression over
them, with a fixed set of builtins and `math`, under its own rlimits. Its stdin is one JSON header line (from the
caller) followed by the raw bytes of the candidate's result channel; it writes one verdict line per test.

The parent reads this file's text once, when `alignrl.rewards.code` is imported, and runs it as
``python -I -S -B -c <this text>``: it imports nothing from alignrl, stdlib only. The program runs only as
``__main__``, so `_decode` and `_main` can be imported and tested directly.
"""

import json
import math
import sys


def _limits(cfg):
    import resource

    for name, value in (
        ("RLIMIT_AS", cfg["memory_bytes"]),
        ("RLIMIT_CPU", cfg["cpu_seconds"]),
        ("RLIMIT_FSIZE", 1 << 20),
        ("RLIMIT_NOFILE", 16),
        ("RLIMIT_CORE", 0),
    ):
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
                    raise _NoValue(f"{sources[i]}: no value (timed out, or the process ended first)")
                if rest == b"!":
                    raise _NoValue(f"{sources[i]} raised")
                if rest == b"?":
                    raise _NoValue(f"{sources[i]} is not plain data")
                try:
                    cache[k] = _decode(json.loads(rest))
                except Exception as exc:
                    raise _NoValue(f"{sources[i]}: unreadable value ({type(exc).__name__})") from None
                return cache[k]

            env = {"__builtins__": safe, "math": math, "_p": value}
            try:
                for source in checks:
                    if not eval(compile(source, f"<test {t}>", "eval"), env):
                        reason = "AssertionError"
                        break
            except _NoValue as exc:
                reason = str(exc)
            except BaseException as exc:
                try:
                    reason = f"{type(exc).__name__}: {str(exc)[:200]}"
                except BaseException:
                    reason = type(exc).__name__
        if reason is None:
            out.write(f"{t} 1\n")
        else:
            reason = " ".join(reason.split())[:300]
            out.write(f"{t} 0 {reason}\n")
        out.flush()


if __name__ == "__main__":
    _main()
