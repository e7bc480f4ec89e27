"""Atomic writes: write to a temp file (or folder) beside the target, then rename over it.

Files and folders get the modes a plain ``open``/``mkdir`` would give under the caller's umask
(``mkstemp`` alone would leave them 0600).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_like_open(path: Path) -> None:
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def _named(target: Path):
    """OS errors about our temporary files name the target the user asked for instead."""
    try:
        yield
    except OSError as err:
        if not err.filename or Path(err.filename).name.startswith(f".{target.name}."):
            raise type(err)(err.errno, err.strerror, str(target)) from None
        raise


@contextmanager
def atomic_path(target: str | Path, suffix: str = ""):
    """Yield a temp path next to ``target``; on success rename it to ``target``, else delete it."""
    target = Path(target)
    with _named(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
        os.close(fd)
    try:
        with _named(target):
            yield Path(tmp)
            _chmod_like_open(Path(tmp))
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json(target: str | Path, obj, indent: int | None = 1) -> None:
    write_text(target, json.dumps(obj, indent=indent))


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temp sibling folder that replaces ``final`` when the block succeeds (deleted otherwise)."""
    final = Path(final)
    with _named(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with _named(final):
            yield tmp
            _chmod_like_open(tmp)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
