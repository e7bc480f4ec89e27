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


class Interrupted(MpeError):
    """The user stopped the run (Ctrl-C); finished work is kept and a rerun resumes."""


def user_message(err: BaseException) -> str | None:
    """One line for an error a user can act on, or None for a bug (which keeps its traceback)."""
    import errno

    name = type(err).__name__
    if isinstance(err, MpeError):
        return str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = err.filename or "a file"
        return f"{where}: no space left on the device; free some space and rerun (finished work is kept)"
    if isinstance(err, PermissionError):
        where = err.filename or err
        return f"{where}: permission denied; make it (and its folder) writable, or point the params elsewhere"
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return f"{err.filename}: {err.strerror.lower()}" if err.filename else str(err)
    if name == "SafetensorError":
        return f"a safetensors file is unreadable (truncated or corrupt): {err}"
    if name in ("WorkerGroupError", "TrainingFailedError") or name.endswith("WorkerGroupError"):
        inner = [line for line in str(err).splitlines() if line.strip()]
        mpe_lines = [line for line in inner if line.startswith("mpe.")]
        return "training failed on a worker: " + (mpe_lines[-1] if mpe_lines else inner[-1] if inner else name)
    return None
