"""The output directory a run owns: one run at a time, one algorithm per directory, nothing of an earlier run
replaced unless the user asks.

- `lock(out)`: an exclusive `flock` on OUTPUT_DIR/.alignrl.lock for the whole run. The kernel drops it when the
  process dies (even by SIGKILL), so a dead run's lock never blocks; a live one makes a second run stop with one
  line naming the holder (pid, host, start time) written in the lock file.
- `alignrl_run.json` records which algorithm the directory holds; `resume` refuses another algorithm's run.
- `prepare(out, algorithm, ...)`: a fresh run refuses a directory holding an earlier run
  (checkpoints, final/, metrics) unless `overwrite_output_dir=true`; it also removes what a killed process left
  half-written (`.final.tmp-*`, `.checkpoint-*.tmp-*`), which only the lock holder may touch.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from alignrl import trackers
from alignrl.checkpoint import CHECKPOINT_DIR, latest_checkpoint
from alignrl.errors import AlignRLError

C = TypeVar("C")
LOCK_FILE = ".alignrl.lock"
RUN_INFO = "alignrl_run.json"
_DEBRIS = (".final.tmp-*", ".final.old-*", ".checkpoint-*.tmp-*", ".checkpoint-*.old-*")
_RUN_FILES = ("metrics.jsonl", "samples.jsonl", "config.yaml", RUN_INFO, trackers.IDS_FILE)

_held: dict[str, int] = {}  # resolved output_dir -> lock file descriptor held by this process


def ensure_dir(out: Path, option: str = "output_dir") -> None:
    """Create `out` (and parents), with one-line errors for a path that is a file or cannot be created."""
    if out.exists() and not out.is_dir():
        raise AlignRLError(f"{option}: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise AlignRLError(f"{option}: {out} (or a parent) exists and is not a directory") from None
    except OSError as e:
        raise AlignRLError(f"{option}: cannot create {out}: {e.strerror}") from None


def lock(out: Path) -> None:
    """Take the run lock on `out` (already created) or raise naming the run that holds it. A lock this process
    still holds from an earlier run that ended without `unlock` (an exception) is taken over."""
    key = str(out.resolve())
    unlock(out)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise AlignRLError(
            f"output_dir {out} is in use by another run ({holder}); wait for it to finish, stop it, or choose "
            "another output_dir"
        ) from None
    except OSError as e:  # a filesystem without flock: run unlocked rather than not at all
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. Lustre mounted noflock
            raise
        return
    _held[key] = fd
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode() + b"\n", 0)


def releases_output_dir(train: Callable[[C], Path]) -> Callable[[C], Path]:
    """Decorator for a trainer's `train(cfg)`: the output_dir lock is released when it returns or raises (an
    interactive session that caught the error can then start another run there); the experiment trackers the run
    left open when it raised are flushed and closed (marked failed)."""

    @functools.wraps(train)
    def wrapper(cfg: C) -> Path:
        try:
            return train(cfg)
        except BaseException:
            trackers.close_open(Path(cfg.output_dir), failed=True)  # type: ignore[attr-defined]
            raise
        finally:
            unlock(Path(cfg.output_dir))  # type: ignore[attr-defined]

    return wrapper


def unlock(out: Path) -> None:
    """Release this process's lock on `out` (no-op if it holds none). The file stays: removing it would let a
    waiting process lock a file that a third one then recreates."""
    fd = _held.pop(str(out.resolve()), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def recorded_algorithm(out: Path) -> str | None:
    """The algorithm an earlier run recorded in `out`, or None."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads((out / RUN_INFO).read_text())["algorithm"])
    return None


def earlier_run(out: Path) -> list[str]:
    """What an earlier run left in `out` (checkpoints, final/, logs), for messages; empty if nothing."""
    found = sorted(
        (p.name for p in out.iterdir() if CHECKPOINT_DIR.match(p.name) and p.is_dir()),
        key=lambda n: int(n.split("-")[1]),
    )
    shown = found if len(found) <= 3 else [found[0], "...", found[-1]]
    if (out / "final").exists():
        shown.append("final/")
    if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0:
        shown.append("metrics.jsonl")
    return shown


def remove_debris(out: Path) -> None:
    """Delete temporary directories a killed process left while writing a checkpoint or final/."""
    for pattern in _DEBRIS:
        for p in out.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def clear_earlier_run(out: Path) -> None:
    """overwrite_output_dir: remove the files an alignrl run writes (nothing else in the directory)."""
    for p in out.iterdir():
        if (CHECKPOINT_DIR.match(p.name) or p.name == "final") and p.is_dir():
            shutil.rmtree(p)
        elif p.name in _RUN_FILES and p.is_file():
            p.unlink()


def check_algorithm(out: Path, algorithm: str, resume: str | None) -> None:
    """Resuming in a directory that holds another algorithm's run is an error."""
    earlier = recorded_algorithm(out)
    if resume and earlier is not None and earlier != algorithm:
        raise AlignRLError(
            f"resume: {out} holds a {earlier} run, not {algorithm}; resume it with `alignrl train {earlier}` or "
            "choose another output_dir"
        )


def prepare(out: Path, algorithm: str, *, resume: str | None, resuming_from_checkpoint: bool, overwrite: bool) -> None:
    """Decide what this run may do with `out` (locked, debris removed, its algorithm checked by check_algorithm):
    refuse to start fresh over an earlier run unless `overwrite`, then record this run's algorithm. resume=auto
    with no checkpoint starts fresh over a run that was killed before its first checkpoint, not over a finished
    one."""
    earlier = recorded_algorithm(out)
    left = earlier_run(out)
    if not resuming_from_checkpoint and left:
        unfinished_same = resume == "auto" and earlier in (None, algorithm) and not (out / "final").exists()
        if not unfinished_same:
            if not overwrite:
                what = f"an earlier {earlier} run" if earlier else "an earlier run"
                hint = "continue it with resume=auto, " if earlier in (None, algorithm) and _has_checkpoint(out) else ""
                raise AlignRLError(
                    f"output_dir {out} already holds {what} ({', '.join(left)}); {hint}choose another output_dir, "
                    "or set overwrite_output_dir=true to replace it"
                )
            clear_earlier_run(out)
    (out / RUN_INFO).write_text(json.dumps({"algorithm": algorithm}) + "\n")


def _has_checkpoint(out: Path) -> bool:
    return latest_checkpoint(out) is not None
