"""Job specs, their validation, the job store and per-process job runtimes."""

from __future__ import annotations

from dmipro.jobs._load import Job, instantiate, load_job, required_fields
from dmipro.jobs.candidate import Candidate, apply_candidate, candidate_of, fingerprint
from dmipro.jobs.runtime import JobRuntime, forget_runtime, get_runtime, register_runtime
from dmipro.jobs.spec import (
    ExecutorConfig,
    JobSpec,
    LMConfig,
    OptimizerConfig,
    RateLimitConfig,
    RegisterConfig,
    RetryConfig,
)
from dmipro.jobs.store import JobRecord, JobState, JobStore, new_job_id

__all__ = [
    "Candidate",
    "ExecutorConfig",
    "Job",
    "JobRecord",
    "JobRuntime",
    "JobSpec",
    "JobState",
    "JobStore",
    "LMConfig",
    "OptimizerConfig",
    "RateLimitConfig",
    "RegisterConfig",
    "RetryConfig",
    "apply_candidate",
    "instantiate",
    "candidate_of",
    "fingerprint",
    "forget_runtime",
    "get_runtime",
    "load_job",
    "new_job_id",
    "register_runtime",
    "required_fields",
]
