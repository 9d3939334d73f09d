"""The dmipro exception tree.

Every error dmipro raises on purpose is a :class:`DmiproError`; the CLI turns one
into a one-line message on stderr and exit status 2.

    DmiproError
    ├── ConfigError            settings, dmipro.yaml, an optional extra that is not installed
    ├── JobSpecError           a job spec that cannot run (carries ``field``)
    │   ├── RefError           a ``module:attr`` reference that cannot be imported or is not allowed
    │   └── DatasetError       a dataset that cannot be loaded or does not fit the program
    ├── LMError                an LM call that failed (carries ``retry_after``)
    │   └── RateLimitError
    ├── ExecutorError          a task could not be shipped or its result collected
    │   ├── TaskError          a task body raised (carries the remote error type)
    │   └── JobTimeoutError    waiting for a submitted job gave up
    ├── DecodeError            a payload or stored record that is not what it claims to be
    ├── EvaluationError        an evaluation that reached ``max_errors``
    ├── OptimizationError      an optimization that cannot go on
    │   └── OptimizerArgumentError  an argument dspy.MIPROv2 also refuses (also a ValueError)
    ├── JobNotFoundError       no job with that id
    ├── StorageError           saving or loading a program failed
    ├── RegistryError          a registry operation that is not allowed
    │   └── NotFoundError      no such program name or version
    └── ExperimentError        an A/B experiment that cannot be created, found or acted on
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatasetError",
    "DecodeError",
    "DmiproError",
    "EvaluationError",
    "ExecutorError",
    "ExperimentError",
    "JobNotFoundError",
    "JobTimeoutError",
    "JobSpecError",
    "LMError",
    "NotFoundError",
    "OptimizationError",
    "OptimizerArgumentError",
    "RateLimitError",
    "RefError",
    "RegistryError",
    "StorageError",
    "TaskError",
]


class DmiproError(Exception):
    """Root of every error dmipro raises on purpose."""


class ConfigError(DmiproError):
    """Settings are invalid, or an optional dependency is missing."""


class JobSpecError(DmiproError):
    """A job spec is invalid; ``field`` names the offending key (dotted) when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class RefError(JobSpecError):
    """A ``package.module:attr`` reference cannot be resolved or is not allowed."""


class DatasetError(JobSpecError):
    """A dataset cannot be loaded, is empty, or does not match the program's fields."""


class LMError(DmiproError):
    """An LM call failed. ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class RateLimitError(LMError):
    """The LM provider refused the call for rate limiting (HTTP 429)."""


class ExecutorError(DmiproError):
    """A task could not be shipped to, or collected from, an executor."""


class TaskError(ExecutorError):
    """A task body raised. ``error_type`` is the original exception's class name."""

    def __init__(self, message: str, *, task: str = "", error_type: str = "") -> None:
        self.task = task
        self.error_type = error_type
        super().__init__(message)


class JobTimeoutError(ExecutorError):
    """``wait`` gave up: the job was still queued or running when the timeout passed."""


class DecodeError(DmiproError):
    """A payload, result or stored record does not decode to what it claims to be."""


class EvaluationError(DmiproError):
    """An evaluation failed on too many examples (``max_errors``)."""


class OptimizationError(DmiproError):
    """An optimization cannot start or go on (bad settings, every evaluation failing)."""


class OptimizerArgumentError(OptimizationError, ValueError):
    """An optimizer argument or dataset that ``dspy.MIPROv2`` refuses with ``ValueError`` too.

    It is a ``ValueError`` so that code written for DSPy's optimizer catches it unchanged.
    """


class JobNotFoundError(DmiproError):
    """No job with the given id exists in the job store."""


class StorageError(DmiproError):
    """An optimized program could not be saved or loaded."""


class RegistryError(DmiproError):
    """A registry operation is not allowed (bad name, hostile import, conflicting state)."""


class NotFoundError(RegistryError):
    """No program with that name, or no such version of it."""


class ExperimentError(DmiproError):
    """An A/B experiment cannot be created, found, recorded into or acted on."""
