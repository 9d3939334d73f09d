"""``optimize``: the coordinator as a task, for executors that run it on a worker."""

from __future__ import annotations

from typing import Any

from dmipro.tasks._registry import task

__all__ = ["optimize_job"]


@task("optimize")
def optimize_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Payload: ``job_id`` and ``executor`` (the backend its work tasks go to).

    Runs or resumes the job; returns its summary. Safe to deliver twice: a finished
    job is reported, not run again.
    """
    from dmipro.teleprompt.mipro import run_job

    result = run_job(payload["job_id"], executor=payload.get("executor"))
    return result
