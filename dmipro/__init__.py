"""dmipro: MIPROv2 prompt optimization for DSPy programs, run as a distributed job system.

import dmipro

result = dmipro.optimize("examples/math_qa/job.yaml")     # in this process, on threads
handle = dmipro.submit("examples/math_qa/job.yaml")       # on Celery workers
program = dmipro.load("math_qa")                           # the deployed version
"""

from __future__ import annotations

import importlib
import typing
from typing import Any

from dmipro.errors import (
    ConfigError,
    DatasetError,
    DecodeError,
    DmiproError,
    EvaluationError,
    ExecutorError,
    ExperimentError,
    JobNotFoundError,
    JobSpecError,
    JobTimeoutError,
    LMAuthError,
    LMBadRequestError,
    LMConnectionError,
    LMContextLengthError,
    LMError,
    LMModelNotFoundError,
    LMQuotaError,
    LMServerError,
    LMTimeoutError,
    NotFoundError,
    OptimizationError,
    OptimizerArgumentError,
    PermanentLMError,
    ProviderUnavailableError,
    RateLimitError,
    RefError,
    RegistryError,
    StorageError,
    TaskError,
    TransientLMError,
)

if typing.TYPE_CHECKING:
    from dmipro import ab
    from dmipro.api import evaluate, optimize
    from dmipro.evaluation import EvaluationResult, Evaluator
    from dmipro.events import Event, Subscriber, bus
    from dmipro.executor_adapters import ExecutorAdapter, InlineAdapter, ThreadAdapter, make_executor
    from dmipro.jobs import Job, JobSpec, JobState, JobStore, load_job
    from dmipro.jobs.submit import JobHandle, cancel, status, submit, wait
    from dmipro.lm import Usage, build_lm
    from dmipro.teleprompt import MIPROv2, OptimizationResult

# Imported on first use, so `dmipro --help` and `import dmipro.errors` stay fast.
_LAZY = {
    "evaluate": "dmipro.api",
    "optimize": "dmipro.api",
    "EvaluationResult": "dmipro.evaluation",
    "Evaluator": "dmipro.evaluation",
    "Event": "dmipro.events",
    "Subscriber": "dmipro.events",
    "bus": "dmipro.events",
    "ExecutorAdapter": "dmipro.executor_adapters",
    "InlineAdapter": "dmipro.executor_adapters",
    "ThreadAdapter": "dmipro.executor_adapters",
    "make_executor": "dmipro.executor_adapters",
    "Job": "dmipro.jobs",
    "JobSpec": "dmipro.jobs",
    "JobState": "dmipro.jobs",
    "JobStore": "dmipro.jobs",
    "load_job": "dmipro.jobs",
    "Usage": "dmipro.lm",
    "build_lm": "dmipro.lm",
    "JobHandle": "dmipro.jobs.submit",
    "cancel": "dmipro.jobs.submit",
    "status": "dmipro.jobs.submit",
    "submit": "dmipro.jobs.submit",
    "wait": "dmipro.jobs.submit",
    "MIPROv2": "dmipro.teleprompt",
    "OptimizationResult": "dmipro.teleprompt",
}


_SUBMODULES = {"ab"}
"""Subpackages reachable as attributes (``dmipro.ab.create``), imported on first use."""


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"dmipro.{name}")
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dmipro' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DatasetError",
    "DecodeError",
    "DmiproError",
    "EvaluationError",
    "EvaluationResult",
    "Evaluator",
    "Event",
    "ExecutorAdapter",
    "ExecutorError",
    "ExperimentError",
    "InlineAdapter",
    "Job",
    "JobHandle",
    "JobNotFoundError",
    "JobTimeoutError",
    "JobSpec",
    "JobSpecError",
    "JobState",
    "JobStore",
    "LMError",
    "LMAuthError",
    "LMBadRequestError",
    "LMConnectionError",
    "LMContextLengthError",
    "LMModelNotFoundError",
    "LMQuotaError",
    "LMServerError",
    "LMTimeoutError",
    "PermanentLMError",
    "ProviderUnavailableError",
    "TransientLMError",
    "MIPROv2",
    "NotFoundError",
    "OptimizationError",
    "OptimizationResult",
    "OptimizerArgumentError",
    "RateLimitError",
    "RefError",
    "RegistryError",
    "StorageError",
    "Subscriber",
    "TaskError",
    "ThreadAdapter",
    "Usage",
    "__version__",
    "ab",
    "build_lm",
    "bus",
    "cancel",
    "evaluate",
    "load",
    "load_job",
    "make_executor",
    "optimize",
    "status",
    "submit",
    "wait",
]


def load(spec: str) -> Any:
    """The deployed version of a registered program (``"math_qa"``) or a given one (``"math_qa@3"``)."""
    from dmipro.registry import load as registry_load  # on first use: `import dmipro` stays light

    return registry_load(spec)
