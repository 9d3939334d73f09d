"""The dmipro exception tree.

Every error dmipro raises on purpose is a :class:`DmiproError`; the CLI turns one
into a one-line message on stderr and exit status 2.

    DmiproError
    ├── ConfigError            settings, dmipro.yaml, an optional extra that is not installed
    ├── JobSpecError           a job spec that cannot run (carries ``field``)
    │   ├── RefError           a ``module:attr`` reference that cannot be imported or is not allowed
    │   └── DatasetError       a dataset that cannot be loaded or does not fit the program
    ├── LMError                an LM call that failed (carries ``retry_after``, ``status``, ``provider``)
    │   ├── TransientLMError   worth retrying: the provider may answer next time
    │   │   ├── RateLimitError      429 (not a quota): slow down, honour ``retry_after``
    │   │   ├── LMServerError       5xx
    │   │   ├── LMTimeoutError      the request timed out
    │   │   ├── LMConnectionError   connection refused or reset, DNS, TLS
    │   │   └── ProviderUnavailableError  the circuit breaker is open for that provider
    │   └── PermanentLMError   retrying cannot help: the job fails fast
    │       ├── LMAuthError         401/403, missing or rejected API key
    │       ├── LMQuotaError        billing or quota exhausted (OpenAI's 429 ``insufficient_quota``)
    │       ├── LMModelNotFoundError  unknown model (404)
    │       ├── LMContextLengthError  the prompt does not fit the model's context window
    │       └── LMBadRequestError   the provider refused the request as malformed (400/422)
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
    "LMAuthError",
    "LMBadRequestError",
    "LMConnectionError",
    "LMContextLengthError",
    "LMError",
    "LMModelNotFoundError",
    "LMQuotaError",
    "LMServerError",
    "LMTimeoutError",
    "PermanentLMError",
    "ProviderUnavailableError",
    "NotFoundError",
    "OptimizationError",
    "OptimizerArgumentError",
    "RateLimitError",
    "RefError",
    "RegistryError",
    "StorageError",
    "TaskError",
    "TransientLMError",
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
    """An LM call failed.

    ``retry_after`` is the provider's hint in seconds, ``status`` the HTTP status and
    ``provider`` the provider's name (``openai``, ``sim``), each when known. Every
    argument but the message is keyword-only, so a worker's error rebuilds from its text.
    """

    limits: dict[str, int] | None = None
    """The provider's advertised limits (``rpm``, ``tpm``) from its ``x-ratelimit-limit-*`` headers."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        provider: str | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.status = status
        self.provider = provider
        super().__init__(message)


class TransientLMError(LMError):
    """The provider may well answer the same call later: retried until the call's deadline."""


class RateLimitError(TransientLMError):
    """The LM provider refused the call for rate limiting (HTTP 429, not a quota)."""


class LMServerError(TransientLMError):
    """The provider failed while handling the call (HTTP 5xx)."""


class LMTimeoutError(TransientLMError):
    """The call timed out."""


class LMConnectionError(TransientLMError):
    """The call never reached the provider, or the connection broke (refused, reset, DNS, TLS)."""


class ProviderUnavailableError(TransientLMError):
    """The circuit breaker is open: the provider kept failing, calls wait instead of hammering it."""


class PermanentLMError(LMError):
    """Retrying cannot help (bad key, no quota, unknown model, bad request): the job fails fast."""


class LMAuthError(PermanentLMError):
    """The provider rejected the credentials (401/403), or no API key was found."""


class LMQuotaError(PermanentLMError):
    """Billing or quota is exhausted (OpenAI answers it as a 429 ``insufficient_quota``)."""


class LMModelNotFoundError(PermanentLMError):
    """The provider does not know the model (404), or does not serve it to this key."""


class LMContextLengthError(PermanentLMError):
    """The prompt does not fit the model's context window."""


class LMBadRequestError(PermanentLMError):
    """The provider refused the request itself (400/422, unsupported parameter or feature)."""


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
