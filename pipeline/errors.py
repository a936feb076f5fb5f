"""The one error hierarchy of the pipeline.

Every error a user can cause or meet carries where it happened and says how to fix it.
The CLI prints ``str(error)`` as one line and exits non-zero; tracebacks only with ``--debug``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""

    exit_code = 1


class ConfigError(PipelineError):
    """A setting is missing, unknown or invalid. ``field`` is the dotted settings path."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelFileError(PipelineError):
    """A model file is missing, unreadable, corrupt or does not match its metadata."""

    exit_code = 3

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class BrokerError(PipelineError):
    """The Kafka cluster (or the embedded broker) could not be reached or started."""

    exit_code = 4


class DataError(PipelineError):
    """An input data file (CSV for simulate/train/backtest) cannot be used as asked."""

    exit_code = 5

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class FencedError(BrokerError):
    """Another instance with the same transactional id took over: this one must stop."""

    exit_code = 6


class TransactionFailed(PipelineError):
    """A micro-batch's transaction was aborted or hung; its effects must be redone."""


class TransactionsUnsupported(BrokerError):
    """The cluster refuses transactions: exactly-once falls back to at-least-once."""
