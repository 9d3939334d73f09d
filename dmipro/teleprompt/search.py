"""The search space and the persistent Optuna study behind MIPROv2's phase 3.

The study lives in the job database (Optuna's RDB storage), named after the job, so a
restarted coordinator continues it. All bookkeeping is on the trials themselves
(one ``dmipro`` user attribute: kind and batch), so the search state can always be
rebuilt from storage — there is no state in closures or in the coordinator's memory.

What optuna-dashboard shows is meant to be read by an operator:

- ``dmipro:<job>`` is TPE's study, as in DSPy: minibatch trials, the baseline and the
  full-valset evaluations together. Its values are on different example sets (a 35-example
  minibatch scores higher or lower by chance), so its "best trial" is not the program
  dmipro returns.
- ``dmipro:<job>:full`` is its companion: the baseline and every full-valset evaluation,
  copied from the main study. Its best trial is the program dmipro returns.

Both studies carry the job, program, metric, LM and optimizer settings as study user
attributes; every trial carries its ``kind``, ``batch`` and, per predictor, the first 200
characters of its instruction and a one-line summary of its demo set.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dmipro.db import patient_connects
from dmipro.jobs.candidate import Candidate

__all__ = [
    "SearchSpace",
    "SearchState",
    "Study",
    "TrialKind",
    "full_study_name",
    "trial_batch",
    "trial_kind",
]


_ATTR = "dmipro"
_INSTRUCTION_CHARS = 200

log = logging.getLogger(__name__)
_writer_lock = threading.Lock()
_writer_pool: ThreadPoolExecutor | None = None


def _writer() -> ThreadPoolExecutor:
    """One thread per process for the readable attributes: writes in order, off the search's path."""
    global _writer_pool
    with _writer_lock:
        if _writer_pool is None:
            _writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dmipro-study-attrs")
        return _writer_pool


def full_study_name(study_name: str) -> str:
    """The companion study holding a search study's baseline and full-valset evaluations."""
    return f"{study_name}:full"


def _demo_summary(index: int, demos: list[dict[str, Any]]) -> str:
    """``set 3: 4 demos (3 bootstrapped, 1 labeled)`` — what an operator needs to tell sets apart."""
    if not demos:
        return f"set {index}: no demos"
    boot = sum(1 for d in demos if d.get("augmented"))
    return f"set {index}: {len(demos)} demos ({boot} bootstrapped, {len(demos) - boot} labeled)"


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
    placeholder: bool = False
    """True for a :meth:`shaped` space: the right dimensions, no contents yet."""

    @classmethod
    def shaped(cls, predictors: tuple[str, ...], *, instructions: int, demo_sets: int | None) -> SearchSpace:
        """A space with the right dimensions and placeholder contents (enough to ask trials)."""
        return cls(
            predictors=predictors,
            instructions={name: [""] * instructions for name in predictors},
            demo_sets=None
            if demo_sets is None
            else {name: [[] for _ in range(demo_sets)] for name in predictors},
            placeholder=True,
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

    def describe(self, params: dict[str, Any]) -> dict[str, str]:
        """Readable user attributes for a trial: instruction text and demo set per predictor."""
        out: dict[str, str] = {}
        for i, name in enumerate(self.predictors):
            text = self.instructions[name][int(params[f"{i}_predictor_instruction"])]
            index = int(params[f"{i}_predictor_instruction"])
            short = text if len(text) <= _INSTRUCTION_CHARS else text[: _INSTRUCTION_CHARS - 1] + "…"
            out[f"{name}.instruction"] = f"#{index}: {short}"
            if self.demo_sets is not None:
                d = int(params[f"{i}_predictor_demos"])
                out[f"{name}.demos"] = _demo_summary(d, self.demo_sets[name][d])
            else:
                out[f"{name}.demos"] = "none (zero-shot search)"
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
    """A seeded TPE study in persistent storage, driven by ask and tell.

    ``attrs`` (job, program, settings ...) are written once as user attributes of the
    study and of its full-evaluation companion (:func:`full_study_name`). A trial's readable
    attributes are written once the real candidates are in place (on :meth:`ask`, or on
    :meth:`use` for trials asked before), on a writer thread while the trial is evaluated,
    and :meth:`tell` waits for them: each is a storage transaction, and the search's
    critical path should not pay for them. The companion is a copy of the main study's
    baseline and full trials, filled in again on the first :meth:`state` of a resumed
    search, so a crash between the two writes loses nothing.
    """

    def __init__(
        self,
        name: str,
        storage_url: str,
        *,
        seed: int,
        space: SearchSpace,
        attrs: dict[str, Any] | None = None,
    ) -> None:
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
            patient_connects(storage.engine)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        self.study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
        )
        self.n_startup_trials = 10
        self._synced = False
        self._pending: dict[int, Future[None]] = {}
        self._storage, self._attrs = storage, dict(attrs or {})
        self._full: Future[Any] | None = None

    @property
    def full(self) -> Any:
        """The companion study (:func:`full_study_name`), opened on the writer thread."""
        if self._full is None:
            self._full = _writer().submit(self._open_full)
        return self._full.result()

    def _open_full(self) -> Any:
        optuna = _optuna()
        name = self.study.study_name
        full = optuna.create_study(
            study_name=full_study_name(name), storage=self._storage, direction="maximize", load_if_exists=True
        )
        if "study" in self.study.user_attrs:  # a resumed study keeps what it was given
            return full
        # "study" first: optuna-dashboard lists the attributes in order, five to a page.
        main = {
            "study": "TPE's trials: minibatch scores, the baseline and full-valset evaluations mixed; "
            f"the program dmipro returns is the best trial of {full_study_name(name)}",
            **self._attrs,
        }
        companion = {
            "study": f"the baseline and every full-valset evaluation of {name}; its best trial is the "
            "program dmipro returns",
            **self._attrs,
        }
        try:
            for key, value in companion.items():
                full.set_user_attr(key, value)
            for key, value in main.items():
                self.study.set_user_attr(key, value)
        except Exception:  # readable extras: the search goes on, the operator is told
            log.warning("could not write the study attributes of %s", name, exc_info=True)
        return full

    def close(self) -> None:
        """Finish the pending attribute writes and close the storage's database connections."""
        for pending in list(self._pending.values()):
            try:
                pending.result()
            except Exception:  # readable extras only; the trial itself is told already
                log.warning("a trial's attributes were not written", exc_info=True)
        self._pending.clear()
        if self._full is not None:
            self._full.exception()  # wait for the companion to be opened before closing under it
        self._storage.engine.dispose()

    def use(self, space: SearchSpace) -> None:
        """Put the real candidates in place of a shaped space; the dimensions must not change."""
        if space.distributions() != self.space.distributions():
            raise ValueError("the search space changed shape after trials were asked")
        self.space = space
        if self._full is None:  # open the companion and write the study's attributes meanwhile
            self._full = _writer().submit(self._open_full)
        optuna = _optuna()
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if self._complete(t):
                self._describe(t._trial_id, t.number, trial_kind(t) or TrialKind.MINIBATCH, dict(t.params))

    def _complete(self, trial: Any) -> bool:
        """Whether a trial has every parameter (one killed while being asked may have none)."""
        return set(trial.params) == set(self.space.distributions())

    def ask(self, kind: str, batch: int, params: dict[str, Any] | None = None) -> Any:
        """A new trial (its params fixed when given), tagged with its kind and batch."""
        if params is not None:
            self.study.enqueue_trial(params)
        trial = self.study.ask(self.space.distributions())
        # One attribute, one storage write: each write is a transaction on the critical path.
        trial.set_user_attr(_ATTR, {"kind": kind, "batch": batch})
        if not self.space.placeholder:
            self._describe(trial._trial_id, trial.number, kind, dict(trial.params))
        return trial

    def _describe(self, trial_id: int, number: int, kind: str, params: dict[str, Any]) -> None:
        """Write a trial's readable attributes on the writer thread; :meth:`tell` waits for them."""
        attrs = self._readable(kind, params)
        storage = self.study._storage  # optuna's Study has no public per-trial-id write

        def write() -> None:
            for key, value in attrs.items():
                storage.set_trial_user_attr(trial_id, key, value)

        self._pending[number] = _writer().submit(write)

    def _readable(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        # Separate keys, because optuna-dashboard's trial table makes a column of each; every
        # key is a storage write before the trial is told, so there are no more than needed.
        out: dict[str, Any] = {"kind": kind}
        if not self.space.placeholder:
            out.update(self.space.describe(params))
        return out

    def tell(self, number: int, score: float) -> None:
        """Finish trial ``number`` with ``score``; a baseline or full trial is copied to the companion."""
        storage = self.study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        trial = storage.get_trial(trial_id)
        if trial.state.is_finished():  # told already (a redelivered result)
            return
        kind = trial_kind(trial) or TrialKind.MINIBATCH
        pending = self._pending.pop(number, None)
        if pending is None:  # asked where this object did not see it: describe it now
            for key, value in self._readable(kind, trial.params).items():
                storage.set_trial_user_attr(trial_id, key, value)
        else:
            try:
                pending.result()
            except Exception:  # readable extras: the search goes on, the operator is told
                log.warning("could not write the attributes of trial %d", number, exc_info=True)
        self.study.tell(number, score, skip_if_finished=True)
        if kind != TrialKind.MINIBATCH:
            self._copy_full(number, trial.params, score, kind, trial_batch(trial))

    def add_full(self, params: dict[str, Any], score: float, batch: int) -> None:
        """Record a full-valset evaluation as a completed trial (as DSPy does), and in the companion."""
        optuna = _optuna()
        number = len(self.study.get_trials(deepcopy=False))
        self.study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=self.space.distributions(),
                value=score,
                user_attrs={
                    _ATTR: {"kind": TrialKind.FULL, "batch": batch},
                    **self._readable(TrialKind.FULL, params),
                },
            )
        )
        self._copy_full(number, params, score, TrialKind.FULL, batch)

    def _copy_full(self, number: int, params: dict[str, Any], score: float, kind: str, batch: int) -> None:
        optuna = _optuna()
        self.full.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=self.space.distributions(),
                value=score,
                user_attrs={"search_trial": number, "batch": batch, **self._readable(kind, params)},
            )
        )

    def sync_full(self) -> int:
        """Copy the main study's baseline and full trials the companion is missing; how many."""
        optuna = _optuna()
        have = {t.user_attrs.get("search_trial") for t in self.full.get_trials(deepcopy=False)}
        added = 0
        for t in self.study.get_trials(deepcopy=False):
            kind = trial_kind(t)
            if (
                t.state == optuna.trial.TrialState.COMPLETE
                and t.value is not None
                and kind in (TrialKind.BASELINE, TrialKind.FULL)
                and t.number not in have
            ):
                self._copy_full(t.number, dict(t.params), float(t.value), kind, trial_batch(t))
                added += 1
        return added

    def state(self) -> SearchState:
        """Rebuild the search bookkeeping from the stored trials."""
        optuna = _optuna()
        if not self._synced and not self.space.placeholder:
            self.sync_full()  # a resumed search: a crash may have come between the two writes
            self._synced = True
        done, running = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING
        st = SearchState()
        for t in self.study.get_trials(deepcopy=False):
            kind = trial_kind(t)
            st.batches = max(st.batches, trial_batch(t) + 1)
            if t.state == running:
                if not self._complete(t):
                    # Killed while it was being asked: never evaluated, and it cannot be. Failed,
                    # it counts for nothing and TPE ignores it; the search asks another.
                    self.study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                    continue
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
