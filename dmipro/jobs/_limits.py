"""How long a job's tasks may run, sized from the job's LM deadline.

An LM call (with its retries and back-off) ends within the job's LM deadline
(``lm.retry.deadline_s``, default :data:`DEFAULT_LM_DEADLINE_S`). A task makes a known
number of sequential calls at most, so its deadline is that many LM deadlines: past it,
the task is stuck (a metric that never returns, a hung connection), and the coordinator
stops waiting for it, revokes it and fails the task, and Celery/RQ stop it where the
pool allows.
"""

from __future__ import annotations

import json
from typing import Any

from dmipro import defaults
from dmipro.config import get_settings
from dmipro.errors import JobSpecError

__all__ = ["DEFAULT_LM_DEADLINE_S", "check_caps", "lm_deadline_s", "task_deadlines"]

DEFAULT_LM_DEADLINE_S = defaults.LM_DEADLINE_S


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


def check_caps(spec: Any) -> None:
    """Raise :class:`JobSpecError` if the job asks for more than the operator's caps allow.

    Runs on the submitter (at validation) and again on the worker that loads the job, whose
    own settings decide: ``DMIPRO_MAX_TRIALS``, ``DMIPRO_MAX_CANDIDATES``,
    ``DMIPRO_MAX_DATASET_ROWS`` and ``DMIPRO_MAX_PAYLOAD_BYTES``.
    """
    settings = get_settings()
    opt = spec.optimizer
    for name, cap, env in (("num_trials", settings.max_trials, "DMIPRO_MAX_TRIALS"),
                           ("num_candidates", settings.max_candidates, "DMIPRO_MAX_CANDIDATES")):
        value = getattr(opt, name)
        if value is not None and value > cap:
            raise JobSpecError(f"{value} is more than this machine allows ({cap}; the operator sets {env})",
                               field=f"optimizer.{name}")
    for split in ("trainset", "valset", "testset"):
        records = getattr(spec, split)
        if isinstance(records, list) and len(records) > settings.max_dataset_rows:
            raise JobSpecError(f"{len(records)} examples is more than this machine allows "
                               f"({settings.max_dataset_rows}; the operator sets DMIPRO_MAX_DATASET_ROWS); "
                               "optimize on a sample", field=split)
    size = len(json.dumps(spec.model_dump(mode="json"), separators=(",", ":")))
    if size > settings.max_payload_bytes:
        raise JobSpecError(f"the job is {size} bytes as JSON with its data, more than this machine allows "
                           f"({settings.max_payload_bytes}; the operator sets DMIPRO_MAX_PAYLOAD_BYTES)")
