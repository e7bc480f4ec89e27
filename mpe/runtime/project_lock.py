"""One pipeline run per project at a time: an advisory lock on ``<project>/.mpe/run.lock``.

The lock is a POSIX ``flock``: the kernel drops it when its holder exits, however it exits (a
``kill -9`` included), so a killed run never leaves a stale lock behind. The file also says who holds
it (pid, host, command, start time), which is what a refused run prints. ``flock`` is reliable on local
file systems; on NFS run one scheduler per project (the Prefect deployment's concurrency limit).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mpe.errors import ProjectBusy
from mpe.files.hashing import text_sha256

LOCK_FILE = Path(".mpe") / "run.lock"
PROJECT_TAG = "mpe.project"  # the MLflow tag that says which project folder a training run belongs to

# Re-entrant within one process: `mpe run` takes the lock before it starts Prefect, and the flow it
# then runs in the same process takes it again (a deployment's run takes it only in the flow).
_held: dict[Path, int] = {}


def project_identity(project: str | Path) -> str:
    """A short id of this project folder on this machine (tags a project's MLflow runs)."""
    return text_sha256(f"{socket.gethostname()}:{Path(project).resolve()}")[:16]


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, started {info.get('started')})"


@contextlib.contextmanager
def project_lock(
    project: str | Path, wait: float | None = 0, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the project's run lock for the ``with`` block.

    ``wait=0``: raise :class:`ProjectBusy` naming the holder if another run has it; ``wait=None``: wait
    as long as it takes; a number: wait up to that many seconds. ``say`` reports the wait once.
    """
    path = (Path(project) / LOCK_FILE).resolve()
    if _held.get(path):
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise ProjectBusy(
                        f"{Path(project).resolve()}: another pipeline run holds this project "
                        f"({_holder(fd)}); wait for it to finish, or run with --wait"
                    ) from None
                if say and not told:
                    say(f"waiting for the run that holds {path}: {_holder(fd)}")
                    told = True
                time.sleep(0.5)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv[:3]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
