"""Atomic writes: write to a temp file (or folder) beside the target, then rename over it.

Files and folders get the modes a plain ``open``/``mkdir`` would give under the caller's umask
(``mkstemp`` alone would leave them 0600).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mpe.errors import StorageError


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
    """OS errors about our temporary files name the target the user asked for instead; so does a
    safetensors write that the OS refused (its error names no file: ``... (os error 28)``)."""
    try:
        yield
    except OSError as err:
        if not err.filename or Path(err.filename).name.startswith(f".{target.name}."):
            raise type(err)(err.errno, err.strerror, str(target)) from None
        raise
    except Exception as err:
        code = re.search(r"\(os error (\d+)\)", str(err)) if type(err).__name__ == "SafetensorError" else None
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(target)) from None
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


def _existing_folder(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def _refuse_mount_point(target: Path, key: str | None = None) -> None:
    if target.is_dir() and os.path.ismount(target):
        named = f"{target} ({key})" if key else str(target)
        elsewhere = f"set {key} to a folder inside it" if key else "write to a folder inside it"
        raise StorageError(
            f"{named}: a mount point; a finished folder is written beside it and renamed over it, which a mount "
            f"point refuses: mount the volume one level up ({target.parent}), or {elsewhere}"
        )


def check_replaceable(target: str | Path, key: str) -> None:
    """Raise :class:`StorageError` before any work when ``target`` (named by the params ``key``) cannot be
    replaced by an atomic write: it is a mount point (a rename over it fails with EBUSY), or its folder is
    on a read-only file system or not writable."""
    target = Path(target)
    _refuse_mount_point(target, key)
    folder = _existing_folder(target.parent)
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise StorageError(
            f"{target} ({key}): read-only file system at {folder}; remount it writable, or point {key} elsewhere"
        )
    if not os.access(folder, os.W_OK):
        raise StorageError(
            f"{target} ({key}): permission denied ({folder} is not writable); make it writable, "
            f"or point {key} elsewhere"
        )


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temp sibling folder that replaces ``final`` when the block succeeds (deleted otherwise)."""
    final = Path(final)
    _refuse_mount_point(final)  # before the block's work, whose result could not be put in place
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
