"""What an optimization produces: the best program, scores, per-phase statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dmipro.jobs.candidate import Candidate
from dmipro.lm.faults import FaultCounts
from dmipro.lm.usage import Usage

__all__ = ["OptimizationResult", "PhaseStats", "json_trial_logs"]


@dataclass
class PhaseStats:
    """LM usage and wall time of one phase; ``resumed`` when it came from a checkpoint.

    ``depth`` is the phase's critical path in LM calls: the calls that must happen one
    after another whatever the concurrency (the longest bootstrap set, the proposer's
    dependent waves, one program run per search round). Depth × latency bounds the
    phase's wall time from below.
    """

    wall_s: float = 0.0
    task_lm: Usage = field(default_factory=Usage)
    prompt_lm: Usage = field(default_factory=Usage)
    resumed: bool = False
    depth: int = 0
    faults: FaultCounts = field(default_factory=FaultCounts)
    """LM failures, retries and rate-limit waits of the phase's calls (both LMs)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "task_lm": self.task_lm.summary(),
            "prompt_lm": self.prompt_lm.summary(),
            "resumed": self.resumed,
            "depth": self.depth,
            "usage": {"task_lm": self.task_lm.to_json(), "prompt_lm": self.prompt_lm.to_json()},
            "faults": self.faults.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, resumed: bool) -> PhaseStats:
        return cls(
            wall_s=float(data.get("wall_s", 0.0)),
            task_lm=Usage.from_json(data.get("usage", {}).get("task_lm")),
            prompt_lm=Usage.from_json(data.get("usage", {}).get("prompt_lm")),
            resumed=resumed,
            depth=int(data.get("depth", 0)),
            faults=FaultCounts.from_json(data.get("faults")),
        )


@dataclass
class OptimizationResult:
    """The outcome of one optimization job."""

    job_id: str
    program: Any
    best_candidate: Candidate
    baseline_score: float
    best_score: float
    trials: int
    stop_reason: str
    phases: dict[str, PhaseStats]
    trial_logs: dict[int, dict[str, Any]]
    candidate_programs: list[dict[str, Any]]
    mb_candidate_programs: list[dict[str, Any]]
    wall_s: float
    program_path: str | None = None
    program_id: str | None = None
    """The program's id in the job database's program store (any machine with access loads it)."""
    registered: dict[str, Any] | None = None
    val_ids: list[int] = field(default_factory=list)
    """Indices of the validation examples the scores are computed on."""
    lm_cache: dict[str, Any] | None = None
    """With ``lm.cache: shared``: the job's shared-cache hits, misses, deduplicated calls, hit rate."""
    trial_candidates: dict[int, Candidate] = field(default_factory=dict)
    """Each logged trial's candidate, by trial number (kept in memory, not in the job row)."""

    @property
    def faults(self) -> FaultCounts:
        """LM failures, retries and rate-limit waits of the whole run."""
        total = FaultCounts()
        for phase in self.phases.values():
            total.add(phase.faults)
        return total

    @property
    def usage(self) -> Usage:
        total = Usage()
        for phase in self.phases.values():
            total.add(phase.task_lm).add(phase.prompt_lm)
        return total

    def summary(self) -> dict[str, Any]:
        """The ``--json`` report."""
        usage = self.usage
        faults = self.faults
        return {
            "job_id": self.job_id,
            "baseline_score": self.baseline_score,
            "best_score": self.best_score,
            "trials": self.trials,
            "lm_calls": usage.calls,
            "tokens": usage.tokens,
            "cost_usd": usage.cost_usd,
            "wall_s": round(self.wall_s, 3),
            "stop_reason": self.stop_reason,
            "lm_errors": faults.lm_errors,
            "retries": faults.retries,
            "rate_limited": faults.rate_limited,
            "rate_limited_wait_s": round(faults.rate_limited_wait_s, 3),
            "program_path": self.program_path,
            "program_id": self.program_id,
            "registered": self.registered,
            **({"lm_cache": self.lm_cache} if self.lm_cache is not None else {}),
        }

    def to_json(self) -> dict[str, Any]:
        """What the job row keeps (no program objects)."""
        return {
            **self.summary(),
            "val_ids": self.val_ids,
            "best_candidate": self.best_candidate,
            "phases": {k: v.to_json() for k, v in self.phases.items()},
            "trial_logs": {str(k): v for k, v in self.trial_logs.items()},
        }


def json_trial_logs(
    trial_logs: dict[int, dict[str, Any]], *, val_size: int, minibatch_size: int
) -> dict[int, dict[str, Any]]:
    """dmipro's trial log entries with ``dspy.MIPROv2``'s JSON keys added.

    A full evaluation gets ``full_eval_score``, a minibatch trial ``mb_score``; every trial
    ``total_eval_calls_so_far`` (examples evaluated, as DSPy counts them) and the chosen
    ``{i}_predictor_instruction`` / ``_demos``.
    """
    logs: dict[int, dict[str, Any]] = {}
    total = 0
    for number in sorted(trial_logs):
        ours = trial_logs[number]
        full = bool(ours.get("full_eval"))
        total += val_size if full else min(minibatch_size, val_size)
        prefix = "full_eval" if full else "mb"
        logs[number] = {
            **ours["params"],
            **ours,
            "total_eval_calls_so_far": total,
            f"{prefix}_score": ours["score"],
        }
    return logs
