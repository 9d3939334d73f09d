"""LMs for jobs: ``dspy.LM`` from a job's LM config, the offline simulator, usage accounting."""

from __future__ import annotations

import os
from typing import Any

from dmipro.lm.usage import ModelUsage, Usage, UsageMeter, metered, price_per_token

__all__ = [
    "SIM_OPTIONS",
    "ModelUsage",
    "Usage",
    "UsageMeter",
    "build_lm",
    "metered",
    "price_per_token",
]


def __getattr__(name: str) -> Any:
    if name == "SIM_OPTIONS":
        from dmipro.lm._sim import SIM_OPTIONS

        return SIM_OPTIONS
    raise AttributeError(name)


def build_lm(config: Any) -> Any:
    """A ``dspy.LM`` for an :class:`~dmipro.jobs.spec.LMConfig`.

    ``sim/<task>`` models run on the in-process simulator; anything else goes to
    ``dspy.LM`` (litellm), with the API key read from the variable ``api_key_env``
    names, so keys never sit in job payloads.
    """
    import dspy

    kwargs = {
        k: v
        for k, v in config.model_dump(exclude_none=True).items()
        if k not in {"model", "sim", "api_key_env"}
    }
    if kwargs.get("cache") == "shared":  # DSPy's cache on; the job runtime routes it to Redis
        kwargs["cache"] = True
    if config.is_sim:
        from dmipro.lm._sim import sim_lm

        return sim_lm(config.model, **(config.sim or {}), **kwargs)
    if config.api_key_env:
        kwargs["api_key"] = os.environ[config.api_key_env]
    return dspy.LM(config.model, **kwargs)
