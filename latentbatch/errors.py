"""Exceptions raised by latentbatch.

Every error a user can cause derives from :class:`LatentbatchError`; its message names the
problem and says what to do, and the command line prints it as a single line.
"""

from __future__ import annotations


class LatentbatchError(Exception):
    """Base class of every error caused by bad input or state."""


class ConfigError(LatentbatchError, ValueError):
    """A configuration value is out of range or inconsistent."""


class DataError(LatentbatchError):
    """An image source cannot be opened or read."""


class CheckpointError(LatentbatchError):
    """A model directory is missing, corrupt, or does not fit its config."""


class OutputError(LatentbatchError):
    """An output location cannot take this decode, or does not hold a finished one."""


class TaskError(LatentbatchError):
    """A Dask task failed with an error that is not the library's own (a bug, or an
    input nothing checked): one sentence naming the task's input, with the worker's
    traceback kept for ``--debug``."""

    def __init__(self, message: str, worker_traceback: str = "") -> None:
        super().__init__(message)
        self.worker_traceback = worker_traceback

    def __reduce__(self) -> tuple[type[TaskError], tuple[str, str]]:
        return (TaskError, (str(self), self.worker_traceback))
