"""The job spec: what to optimize, on what data, with which LMs, where.

A :class:`JobSpec` is plain data (pydantic, unknown keys rejected) loaded from YAML or
a dict; :func:`dmipro.jobs.load_job` validates it completely — references import and
have the right kind, datasets load and fit the program, the LM config is complete —
and returns a :class:`~dmipro.jobs.Job` ready to run.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmipro import defaults

__all__ = [
    "DataSource",
    "ExecutorConfig",
    "JobSpec",
    "LMConfig",
    "OptimizerConfig",
    "RateLimitConfig",
    "RegisterConfig",
    "RetryConfig",
]

DataSource = str | list[dict[str, Any]]
"""A path (.jsonl/.json/.csv, relative to the job file), a ``module:attr`` ref, or inline records."""

_SECRET_KEYS = {"api_key", "apikey", "secret", "password", "token", "authorization", "x-api-key"}


def _find_secret(value: Any, path: str = "") -> str | None:
    """The dotted path of the first secret-looking key anywhere in ``value``, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key).lower() in _SECRET_KEYS:
                return where
            found = _find_secret(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _find_secret(item, f"{path}[{i}]")
            if found:
                return found
    return None


class RetryConfig(BaseModel):
    """How a transient LM failure (429, 5xx, timeout, connection reset) is retried.

    The provider's ``Retry-After`` is honoured when it gives one (capped at
    ``max_retry_after_s``); otherwise the wait is exponential backoff with full jitter,
    ``uniform(0, min(max_backoff_s, initial_backoff_s * 2**attempt))``. A call gives up
    when its next wait would pass ``deadline_s`` or after ``max_attempts`` attempts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    deadline_s: float = Field(default=defaults.LM_DEADLINE_S, gt=0)
    max_attempts: int | None = Field(default=None, ge=1)
    initial_backoff_s: float = Field(default=0.5, gt=0)
    max_backoff_s: float = Field(default=30.0, gt=0)
    max_retry_after_s: float = Field(default=120.0, gt=0)


class RateLimitConfig(BaseModel):
    """A provider limit every process of the fleet stays under together (per provider, model, key name).

    ``rpm`` requests and ``tpm`` tokens per minute; ``None`` declares no limit, and the
    fleet then adapts to the provider's 429s (shared cool-down, AIMD concurrency).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    adaptive: bool = True
    """Pause the key fleet-wide on a 429 and halve concurrency (AIMD) when none is declared."""
    breaker_failures: int = Field(default=20, ge=1)
    """Consecutive transient failures that open the circuit breaker for the key."""
    breaker_open_s: float = Field(default=10.0, gt=0)
    """How long an open breaker holds calls back before one probe call is let through."""


LM_SETTINGS = frozenset({
    "model_type", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs",
    "top_logprobs", "timeout", "max_completion_tokens", "reasoning_effort", "use_developer_role",
    "api_version", "retry", "rate_limit",
})
"""LM settings a job may give beyond LMConfig's own fields: known ``dspy.LM``/litellm arguments.

Anything else (``extra_headers``, ``base_url``, provider credentials, callbacks) is refused:
a job chooses how the model answers, never where a worker's request goes or what it carries.
"""

_SECRET_WORDS = ("key", "secret", "password", "passwd", "token", "auth", "credential", "signature", "sig")


def _check_api_base(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"api_base is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("api_base must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("api_base must not carry credentials (user:password@); name the key's "
                         "environment variable with api_key_env")
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if any(word in name.lower() for word in _SECRET_WORDS):
            raise ValueError(f"api_base must not carry credentials (query parameter {name!r}); name the "
                             "key's environment variable with api_key_env")


class LMConfig(BaseModel):
    """An LM: anything ``dspy.LM`` takes. Keys are named by ``api_key_env``, never written inline."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str = Field(min_length=1)
    temperature: float | None = None
    max_tokens: int | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    cache: bool | Literal["shared"] | None = None
    """DSPy's response cache on/off; ``shared``: also one cache for every worker, in Redis."""
    num_retries: int | None = None
    sim: dict[str, Any] | None = None
    """Simulator options (latency_ms, rate_limit_rate, ...); only for ``sim/*`` models."""
    retry: RetryConfig = Field(default_factory=RetryConfig)
    """dmipro's retries of transient failures (DSPy's own ``num_retries`` is turned off under it)."""
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    """The fleet-wide limit for this LM's provider, model and key name."""

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> LMConfig:
        extra = self.model_extra or {}
        path = _find_secret(extra)
        if path is None:
            path = next((k for k in extra if k not in LM_SETTINGS
                         and any(w in k.lower() for w in _SECRET_WORDS)), None)
        if path is not None:
            raise ValueError(
                f"'{path}' must not be written in a job; put the key in an environment variable "
                "and name it with api_key_env"
            )
        unknown = sorted(set(extra) - LM_SETTINGS)
        if unknown:
            raise ValueError(
                f"unknown LM setting(s) {unknown}; a job may set {sorted(LM_SETTINGS | _OWN_FIELDS)} "
                "(endpoints, headers and credentials are the operator's, not the job's)"
            )
        if self.api_base is not None:
            _check_api_base(self.api_base)
        return self

    @property
    def is_sim(self) -> bool:
        return self.model.startswith("sim/")


_OWN_FIELDS = frozenset(LMConfig.model_fields)


class OptimizerConfig(BaseModel):
    """MIPROv2 settings; the names and defaults are ``dspy.MIPROv2``'s, plus dmipro's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    auto: Literal["light", "medium", "heavy"] | None = "light"
    seed: int = 9
    num_candidates: int | None = Field(default=None, ge=1)
    num_trials: int | None = Field(default=None, ge=1)
    max_bootstrapped_demos: int = Field(default=4, ge=0)
    max_labeled_demos: int = Field(default=4, ge=0)
    max_rounds: int = Field(default=1, ge=1)
    teacher: str | None = None
    """A ``module:attr`` reference to a teacher program for bootstrapping (default: the student)."""
    metric_threshold: float | None = None
    max_errors: int | None = Field(default=None, ge=1)
    minibatch: bool = True
    minibatch_size: int = Field(default=35, ge=1)
    minibatch_full_eval_steps: int = Field(default=5, ge=1)
    program_aware_proposer: bool = True
    data_aware_proposer: bool = True
    tip_aware_proposer: bool = True
    fewshot_aware_proposer: bool = True
    view_data_batch_size: int = Field(default=10, ge=1)
    init_temperature: float = 1.0
    parallel_trials: int | None = Field(default=None, ge=1)
    """Trials asked and evaluated at once; None fills the executor's capacity, 1 follows DSPy."""
    max_lm_calls: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _auto_or_explicit(self) -> OptimizerConfig:
        if self.auto is not None and (self.num_candidates is not None or self.num_trials is not None):
            raise ValueError(
                "auto sets num_candidates and num_trials itself; set auto: null to give them explicitly"
            )
        if self.auto is None and (self.num_candidates is None or self.num_trials is None):
            raise ValueError("with auto: null, give both num_candidates and num_trials")
        return self


class ExecutorConfig(BaseModel):
    """Where the tasks run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["inline", "thread", "celery", "rq"] = "thread"
    concurrency: int = Field(default=16, ge=1, le=4096)
    chunk_size: int = Field(default=5, ge=1)
    """Largest number of examples one evaluation task scores."""
    force_sqlite: bool = False
    """Allow a SQLite job database with workers that may be on other machines."""
    priority: float = Field(default=1.0, gt=0, le=100)
    """Weight in the fleet's fair share between running jobs (Celery, RQ): 2 gets twice the slots of 1."""


class RegisterConfig(BaseModel):
    """Register the optimized program under ``name``; ``deploy`` None means the registry's auto rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=f"^{defaults.NAME_PATTERN}$")
    deploy: bool | None = False


class JobSpec(BaseModel):
    """One optimization job, as written in a job file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(min_length=1, max_length=128, pattern=f"^{defaults.NAME_PATTERN}$")
    program: str
    metric: str
    trainset: DataSource
    valset: DataSource | None = None
    testset: DataSource | None = None
    input_keys: list[str] = Field(min_length=1)
    lm: LMConfig
    prompt_lm: LMConfig | None = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    registration: RegisterConfig | None = Field(default=None, alias="register")
    """The ``register:`` block (named ``registration`` in Python: BaseModel owns ``register``)."""
    dspy_settings: dict[str, Any] | None = None
    """DSPy settings applied around every task (``dspy.context``): ``adapter`` by class name
    (ChatAdapter, JSONAdapter, XMLAdapter) and plain JSON flags such as ``provide_traceback``."""

    @field_validator("input_keys")
    @classmethod
    def _unique_keys(cls, keys: list[str]) -> list[str]:
        if len(set(keys)) != len(keys):
            raise ValueError("input_keys has duplicates")
        return keys

    @field_validator("dspy_settings")
    @classmethod
    def _known_adapter(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        adapters = ("ChatAdapter", "JSONAdapter", "XMLAdapter")
        if value and value.get("adapter") is not None and value["adapter"] not in adapters:
            raise ValueError(f"adapter must be one of {', '.join(adapters)}, not {value['adapter']!r}")
        return value

    @property
    def effective_prompt_lm(self) -> LMConfig:
        return self.prompt_lm or self.lm
