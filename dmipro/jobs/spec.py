"""The job spec: what to optimize, on what data, with which LMs, where.

A :class:`JobSpec` is plain data (pydantic, unknown keys rejected) loaded from YAML or
a dict; :func:`dmipro.jobs.load_job` validates it completely — references import and
have the right kind, datasets load and fit the program, the LM config is complete —
and returns a :class:`~dmipro.jobs.Job` ready to run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DataSource",
    "ExecutorConfig",
    "JobSpec",
    "LMConfig",
    "OptimizerConfig",
    "RegisterConfig",
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

    @model_validator(mode="after")
    def _no_inline_secrets(self) -> LMConfig:
        path = _find_secret(self.model_extra or {})
        if path is not None:
            raise ValueError(
                f"'{path}' must not be written in a job; put the key in an environment variable "
                "and name it with api_key_env"
            )
        return self

    @property
    def is_sim(self) -> bool:
        return self.model.startswith("sim/")


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

    name: str = Field(min_length=1, max_length=128)
    deploy: bool | None = False


class JobSpec(BaseModel):
    """One optimization job, as written in a job file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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

    @field_validator("input_keys")
    @classmethod
    def _unique_keys(cls, keys: list[str]) -> list[str]:
        if len(set(keys)) != len(keys):
            raise ValueError("input_keys has duplicates")
        return keys

    @property
    def effective_prompt_lm(self) -> LMConfig:
        return self.prompt_lm or self.lm
