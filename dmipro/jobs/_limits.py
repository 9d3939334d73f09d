"""How long a job's tasks may run, sized from the job's LM deadline.

An LM call (with its retries and back-off) ends within the job's LM deadline
(``lm.retry.deadline_s``, default :data:`DEFAULT_LM_DEADLINE_S`). A task makes a known
number of sequential calls at most, so its deadline is that many LM deadlines: past it,
the task is stuck (a metric that never returns, a hung connection), and the coordinator
stops waiting for it, revokes it and fails the task, and Celery/RQ stop it where the
pool allows.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_LM_DEADLINE_S", "lm_deadline_s", "task_deadlines"]

DEFAULT_LM_DEADLINE_S = 600.0
"""An LM call's deadline, retries included, when the job's LM config does not set one."""


def lm_deadline_s(cfg: Any) -> float:
    """``cfg.retry.deadline_s`` (a model or a dict), or :data:`DEFAULT_LM_DEADLINE_S`."""
    retry = getattr(cfg, "retry", None)
    if retry is None:
        retry = (getattr(cfg, "model_extra", None) or {}).get("retry")
    value = retry.get("deadline_s") if isinstance(retry, dict) else getattr(retry, "deadline_s", None)
    try:
        seconds = float(value) if value is not None else DEFAULT_LM_DEADLINE_S
    except (TypeError, ValueError):
        seconds = DEFAULT_LM_DEADLINE_S
    return seconds if seconds > 0 else DEFAULT_LM_DEADLINE_S


def task_deadlines(spec: Any, *, predictors: int, train_size: int) -> dict[str, float]:
    """Seconds each task may run, by task name (``"*"``: any other task).

    An evaluation chunk makes ``chunk_size × predictors`` sequential task-LM calls; a demo
    set at most ``train_size × max_rounds × predictors``; a proposal a few prompt-LM calls.
    """
    task = lm_deadline_s(spec.lm)
    prompt = lm_deadline_s(spec.effective_prompt_lm)
    per_example = task * max(1, predictors)
    return {
        "evaluate_chunk": per_example * spec.executor.chunk_size,
        "bootstrap_demo_set": per_example * max(1, train_size) * spec.optimizer.max_rounds,
        "*": max(prompt * 4, per_example * spec.executor.chunk_size),
    }
