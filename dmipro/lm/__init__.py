"""LMs for jobs: ``dspy.LM`` from a job's LM config behind dmipro's LM boundary (error classes,
retries, the fleet-wide rate limiter), the offline simulator, usage accounting."""

from __future__ import annotations

import os
from typing import Any

from dmipro.lm import _sim, ratelimit, retry
from dmipro.lm._sim import SIM_OPTIONS
from dmipro.lm.faults import FaultCounts, Outcome, classify, to_lm_error
from dmipro.lm.ratelimit import RateLimiter
from dmipro.lm.retry import GuardedLM
from dmipro.lm.usage import ModelUsage, Usage, UsageMeter, metered, price_per_token

__all__ = [
    "SIM_OPTIONS",
    "NO_KEY",
    "FaultCounts",
    "GuardedLM",
    "ModelUsage",
    "Outcome",
    "RateLimiter",
    "Usage",
    "UsageMeter",
    "build_lm",
    "classify",
    "metered",
    "price_per_token",
    "to_lm_error",
]


NO_KEY = "dmipro-no-key"
"""The key sent to a job's ``api_base`` when the job names no ``api_key_env``."""


def build_lm(config: Any, *, shared_url: str | None = None) -> Any:
    """A ``dspy.LM`` for an :class:`~dmipro.jobs.spec.LMConfig`, behind dmipro's LM boundary.

    ``sim/<task>`` models run on the in-process simulator; anything else goes to
    ``dspy.LM`` (litellm), with the API key read from the variable ``api_key_env``
    names, so keys never sit in job payloads. Calls go through the key's rate limiter
    (shared through the Redis at ``shared_url`` when given) and dmipro's retries
    (``config.retry``); DSPy's own ``num_retries`` is set to 0 so attempts are not
    multiplied. A ``num_retries`` in the config caps dmipro's attempts instead.
    """
    kwargs = {
        k: v
        for k, v in config.model_dump(exclude_none=True).items()
        if k not in {"model", "sim", "api_key_env", "retry", "rate_limit", "num_retries"}
    }
    kwargs["num_retries"] = 0
    policy = config.retry
    if config.num_retries is not None and policy.max_attempts is None:
        policy = policy.model_copy(update={"max_attempts": config.num_retries + 1})
    if kwargs.get("cache") == "shared":  # DSPy's cache on; the job runtime routes it to Redis
        kwargs["cache"] = True
    if config.is_sim:
        lm = _sim.sim_lm(config.model, lm_class=GuardedLM, **(config.sim or {}), **kwargs)
    else:
        if config.api_key_env:
            kwargs["api_key"] = os.environ[config.api_key_env]
        elif config.api_base:
            # litellm would otherwise send the provider key from this process's environment
            # (OPENAI_API_KEY, ...) to an endpoint the job chose.
            kwargs["api_key"] = NO_KEY
        lm = GuardedLM(config.model, **kwargs)
    key = ratelimit.limiter_key(config.model, config.api_key_env, config.api_base)
    limiter = ratelimit.limiter_for(key, config.rate_limit, redis_url=shared_url)
    lm._dmipro_guard = retry.LMGuard(
        model=config.model, key_env=config.api_key_env, retry=policy, limiter=limiter
    )
    return lm
