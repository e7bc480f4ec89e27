"""Errors a user can act on. The CLI prints their one-line message and exits 2 (traceback only with
``--debug``); anything else is a bug and keeps its traceback. Code that finds bad input raises one of these
(naming the file, key or row), never a bare ``ValueError``, which stays a programming error."""

from __future__ import annotations


class MpeError(Exception):
    """A failure caused by input, configuration or environment; the message names the file, key or row
    and says what to do."""


class ConfigError(MpeError, ValueError):
    """A config file or mapping failed validation; the message names the key."""


class DataError(MpeError):
    """Bad input data; the message names the file and the column or rows."""


class BaseModelError(MpeError):
    """The base model could not be resolved; the message says which name and what to do."""


class CacheMismatch(MpeError):
    """A cache folder was written for a different configuration."""


class StageInputError(MpeError):
    """A stage's input is missing or stale (e.g. train before cache); the message names the stage to run."""


class ProjectBusy(MpeError):
    """Another pipeline run holds the project's run lock; the message names it."""


class ServiceError(MpeError):
    """A local service (PostgreSQL, the MLflow tracking server) could not start or stop; the message says
    why and where its log is."""


class TrackingError(MpeError):
    """The MLflow tracking store cannot be used (a damaged SQLite file, a server that does not answer); the
    message names it and what to do."""


class StorageError(MpeError):
    """A folder cannot take a stage's output (a mount point a rename cannot replace, a read-only file
    system); the message names it and what to do."""


class Interrupted(MpeError):
    """The user stopped the run (Ctrl-C); finished work is kept and a rerun resumes."""


def _storage_advice() -> dict[int, str]:
    import errno

    kept = "(finished work is kept)"
    return {
        errno.ENOSPC: f"no space left on the device; free some space and rerun {kept}",
        errno.EDQUOT: f"disk quota exceeded; free some space or raise the quota and rerun {kept}",
        errno.EFBIG: f"file too large for the file system or the size limit (ulimit -f); raise it and rerun {kept}",
        errno.EROFS: f"read-only file system; remount it writable or point the params at a writable folder {kept}",
        errno.EBUSY: (
            "busy: a mount point (or a folder in use) cannot be replaced, and a finished folder replaces its "
            f"target by a rename; mount the volume one level up, or write to a folder inside it {kept}"
        ),
    }


_STORAGE_ADVICE = _storage_advice()


def user_message(err: BaseException) -> str | None:
    """One line for an error a user can act on, or None for a bug (which keeps its traceback)."""
    name = type(err).__name__
    if isinstance(err, MpeError):
        return str(err)
    if isinstance(err, OSError) and err.errno in _STORAGE_ADVICE:
        return f"{err.filename or 'a file'}: {_STORAGE_ADVICE[err.errno]}"
    if isinstance(err, PermissionError):
        where = err.filename or err
        return f"{where}: permission denied; make it (and its folder) writable, or point the params elsewhere"
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return f"{err.filename}: {err.strerror.lower()}" if err.filename else str(err)
    if name == "SafetensorError" and "serializing" in str(err) and "deserializing" not in str(err):
        return f"a safetensors file could not be written: {err}"
    if name == "SafetensorError":
        return f"a safetensors file is unreadable (truncated or corrupt): {err}"
    if name in ("WorkerGroupError", "TrainingFailedError") or name.endswith("WorkerGroupError"):
        inner = [line for line in str(err).splitlines() if line.strip()]
        mpe_lines = [line for line in inner if line.startswith("mpe.")]
        return "training failed on a worker: " + (mpe_lines[-1] if mpe_lines else inner[-1] if inner else name)
    return None
