"""Errors a user can act on. The CLI prints their one-line message and exits 2 (traceback only with
``--debug``); anything else is a bug and keeps its traceback."""

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
