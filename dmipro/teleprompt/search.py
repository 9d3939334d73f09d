"""The search space and the persistent Optuna study behind MIPROv2's phase 3.

The study lives in the job database (Optuna's RDB storage), named after the job, so a
restarted coordinator continues it. All bookkeeping is on the trials themselves
(one ``dmipro`` user attribute: kind and batch), so the search state can always be
rebuilt from storage — there is no state in closures or in the coordinator's memory.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from dmipro.jobs.candidate import Candidate

__all__ = ["SearchSpace", "SearchState", "Study", "TrialKind", "trial_batch", "trial_kind"]


_ATTR = "dmipro"


def trial_batch(trial: Any) -> int:
    """The batch (round of asks) a trial belongs to; its minibatch is drawn from it."""
    return int(trial.user_attrs.get(_ATTR, {}).get("batch", 0))


def trial_kind(trial: Any) -> str | None:
    """The kind (baseline, minibatch, full) dmipro recorded on a trial."""
    kind = trial.user_attrs.get(_ATTR, {}).get("kind")
    return str(kind) if kind is not None else None


class TrialKind:
    """Values of the ``kind`` user attribute."""

    BASELINE = "baseline"
    MINIBATCH = "minibatch"
    FULL = "full"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:  # optuna is a core dependency; this is a broken install
        raise ImportError("dmipro needs optuna: pip install 'optuna>=5'") from exc
    return optuna


@dataclass(frozen=True)
class SearchSpace:
    """Instruction index and demo-set index per predictor, as DSPy names the parameters."""

    predictors: tuple[str, ...]
    instructions: dict[str, list[str]]
    demo_sets: dict[str, list[list[dict[str, Any]]]] | None

    @classmethod
    def shaped(cls, predictors: tuple[str, ...], *, instructions: int, demo_sets: int | None) -> SearchSpace:
        """A space with the right dimensions and placeholder contents (enough to ask trials)."""
        return cls(
            predictors=predictors,
            instructions={name: [""] * instructions for name in predictors},
            demo_sets=None
            if demo_sets is None
            else {name: [[] for _ in range(demo_sets)] for name in predictors},
        )

    def distributions(self) -> dict[str, Any]:
        dist = _optuna().distributions.CategoricalDistribution
        out: dict[str, Any] = {}
        for i, name in enumerate(self.predictors):
            out[f"{i}_predictor_instruction"] = dist(list(range(len(self.instructions[name]))))
            if self.demo_sets is not None:
                out[f"{i}_predictor_demos"] = dist(list(range(len(self.demo_sets[name]))))
        return out

    def baseline_params(self) -> dict[str, int]:
        return {p: 0 for p in self.distributions()}

    def candidate(self, params: dict[str, Any]) -> Candidate:
        """The instructions and demos ``params`` choose."""
        out: Candidate = {}
        for i, name in enumerate(self.predictors):
            part: dict[str, Any] = {
                "instruction": self.instructions[name][int(params[f"{i}_predictor_instruction"])]
            }
            if self.demo_sets is not None:
                part["demos"] = self.demo_sets[name][int(params[f"{i}_predictor_demos"])]
            out[name] = part
        return out

    def key(self, params: dict[str, Any]) -> str:
        """DSPy's readable key: ``Predictor 0: Instruction 1,Predictor 0: Few-Shot Set 3``."""
        parts = []
        for i in range(len(self.predictors)):
            parts.append(f"Predictor {i}: Instruction {int(params[f'{i}_predictor_instruction'])}")
            if self.demo_sets is not None:
                parts.append(f"Predictor {i}: Few-Shot Set {int(params[f'{i}_predictor_demos'])}")
        return ",".join(parts)


@dataclass
class SearchState:
    """Everything the coordinator decides from, rebuilt from the study's trials."""

    baseline: Any | None = None
    minibatch_done: int = 0
    full_done: int = 0
    batches: int = 0
    running: list[Any] = field(default_factory=list)
    mb_scores: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    first_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    full_scores: dict[str, float] = field(default_factory=dict)
    best_key: str | None = None
    best_score: float = -math.inf
    best_params: dict[str, Any] | None = None
    completed: int = 0

    def next_full_evals(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """The ``limit`` combinations with the best mean minibatch score not yet fully evaluated."""
        ranked = sorted(
            (k for k in self.mb_scores if k not in self.full_scores),
            key=lambda k: -sum(self.mb_scores[k]) / len(self.mb_scores[k]),
        )
        return [(k, self.first_params[k]) for k in ranked[:limit]]


class Study:
    """A seeded TPE study in persistent storage, driven by ask and tell."""

    def __init__(self, name: str, storage_url: str, *, seed: int, space: SearchSpace) -> None:
        optuna = _optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        sqlite = storage_url.startswith("sqlite")
        # PostgreSQL: check pooled connections and wait out a server restart, as the job store does.
        engine_kwargs: dict[str, Any] = (
            {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
        )
        storage = optuna.storages.RDBStorage(storage_url, engine_kwargs=engine_kwargs)
        if not sqlite:
            from dmipro.db import patient_connects

            patient_connects(storage.engine)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        self.study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
        )
        self.n_startup_trials = 10

    def use(self, space: SearchSpace) -> None:
        """Put the real candidates in place of a shaped space; the dimensions must not change."""
        if space.distributions() != self.space.distributions():
            raise ValueError("the search space changed shape after trials were asked")
        self.space = space

    def ask(self, kind: str, batch: int, params: dict[str, Any] | None = None) -> Any:
        """A new trial (its params fixed when given), tagged with its kind and batch."""
        if params is not None:
            self.study.enqueue_trial(params)
        trial = self.study.ask(self.space.distributions())
        # One attribute, one storage write: each write is a transaction on the critical path.
        trial.set_user_attr(_ATTR, {"kind": kind, "batch": batch})
        return trial

    def tell(self, number: int, score: float) -> None:
        self.study.tell(number, score, skip_if_finished=True)

    def add_full(self, params: dict[str, Any], score: float, batch: int) -> None:
        """Record a full-valset evaluation as a completed trial (as DSPy does)."""
        optuna = _optuna()
        self.study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=self.space.distributions(),
                value=score,
                user_attrs={_ATTR: {"kind": TrialKind.FULL, "batch": batch}},
            )
        )

    def state(self) -> SearchState:
        """Rebuild the search bookkeeping from the stored trials."""
        optuna = _optuna()
        done, running = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING
        st = SearchState()
        wanted = set(self.space.distributions())
        for t in self.study.get_trials(deepcopy=False):
            kind = trial_kind(t)
            if t.state == running and set(t.params) != wanted:
                # A process killed between asking a trial and storing its choices left it
                # half-made: nothing was evaluated for it, so it is dropped, not re-run.
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                continue
            st.batches = max(st.batches, trial_batch(t) + 1)
            if t.state == running:
                st.running.append(t)
                continue
            if t.state != done or t.value is None:
                continue
            st.completed += 1
            key = self.space.key(t.params)
            if kind == TrialKind.MINIBATCH:
                st.minibatch_done += 1
                st.mb_scores[key].append(float(t.value))
                st.first_params.setdefault(key, dict(t.params))
                continue
            if kind == TrialKind.BASELINE:
                st.baseline = t
            else:
                st.full_done += 1
            st.full_scores[key] = float(t.value)
            if float(t.value) > st.best_score:  # strict: ties keep the earlier program, as DSPy
                st.best_score, st.best_key, st.best_params = float(t.value), key, dict(t.params)
        return st

    def trials(self) -> list[Any]:
        return list(self.study.get_trials(deepcopy=False))
