"""The search space and the persistent Optuna study behind MIPROv2's phase 3.

The study lives in the job database (Optuna's RDB storage), named after the job, so a
restarted coordinator continues it. All bookkeeping is on the trials themselves
(one ``dmipro`` user attribute: kind and batch), so the search state can always be
rebuilt from storage: the in-memory copy TPE samples from (see :class:`Study`) is
loaded from it, and nothing else lives in closures or in the coordinator's memory.

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

import copy
import json
import logging
import math
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from dmipro.db import patient_connects
from dmipro.errors import StorageError
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


class _TrialRows:
    """Trials written to optuna's own tables with SQLAlchemy Core: one transaction each.

    Optuna's RDB storage writes a trial through its ORM one attribute at a time, finding
    the trial again for each (about fifteen statements for a trial with two params and
    four attributes). Here a trial is one insert per table, in the layout and encodings
    optuna reads back (its own table objects, value types and distribution JSON), so
    ``optuna.load_study`` and optuna-dashboard see the same study.
    """

    def __init__(self, engine: Any) -> None:
        from optuna.storages._rdb import models

        self.engine, self.models = engine, models

    def add(self, study_id: int, trial: Any) -> tuple[int, int]:
        """Insert ``trial`` (a FrozenTrial) whole; its id and number, numbered as optuna does."""
        from optuna.distributions import distribution_to_json

        m = self.models
        trials = m.TrialModel.__table__
        with self.engine.begin() as conn:
            # As optuna numbers a trial: under the study's row lock (PostgreSQL), the count of the
            # study's trials inserted before it (SQLite holds its write lock from the insert on).
            studies = m.StudyModel.__table__
            lock = sa.select(studies.c.study_id).where(studies.c.study_id == study_id).with_for_update()
            conn.execute(lock)
            trial_id = conn.execute(
                trials.insert().values(
                    study_id=study_id,
                    state=trial.state,
                    datetime_start=_utc(trial.datetime_start),
                    datetime_complete=_utc(trial.datetime_complete),
                )
            ).inserted_primary_key[0]
            before = (trials.c.study_id == study_id) & (trials.c.trial_id < trial_id)
            number = conn.execute(sa.select(sa.func.count()).select_from(trials).where(before)).scalar_one()
            conn.execute(trials.update().where(trials.c.trial_id == trial_id).values(number=number))
            params = [
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": trial.distributions[name].to_internal_repr(value),
                    "distribution_json": distribution_to_json(trial.distributions[name]),
                }
                for name, value in trial.params.items()
            ]
            if params:
                conn.execute(m.TrialParamModel.__table__.insert(), params)
            self._insert_attrs(conn, trial_id, trial.user_attrs)
            if trial.value is not None:
                self._insert_value(conn, trial_id, trial.value)
        return int(trial_id), int(number)

    def finish(self, trial_id: int, value: float) -> bool:
        """Complete a running trial with ``value``; False if it was not running."""
        from optuna.trial import TrialState

        trials = self.models.TrialModel.__table__
        with self.engine.begin() as conn:
            done = conn.execute(
                trials.update()
                .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.RUNNING)
                .values(state=TrialState.COMPLETE, datetime_complete=_utc(datetime.now()))
            )
            if done.rowcount != 1:
                return False
            self._insert_value(conn, trial_id, value)
        return True

    def set_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Set user attributes of a trial (replacing any of the same keys), in one transaction."""
        table = self.models.TrialUserAttributeModel.__table__
        with self.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.trial_id == trial_id, table.c.key.in_(list(attrs))))
            self._insert_attrs(conn, trial_id, attrs)

    def _insert_attrs(self, conn: Any, trial_id: int, attrs: dict[str, Any]) -> None:
        if attrs:
            conn.execute(
                self.models.TrialUserAttributeModel.__table__.insert(),
                [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()],
            )

    def _insert_value(self, conn: Any, trial_id: int, value: float) -> None:
        model = self.models.TrialValueModel
        stored, kind = model.value_to_stored_repr(value)
        conn.execute(
            model.__table__.insert().values(trial_id=trial_id, objective=0, value=stored, value_type=kind)
        )


def _utc(moment: datetime | None) -> datetime | None:
    """Naive UTC, as optuna's RDB storage stores trial times (it reads them back as local)."""
    return None if moment is None else moment.astimezone(UTC).replace(tzinfo=None)


class Study:
    """A seeded TPE study in persistent storage, driven by ask and tell.

    The job database holds the study; TPE samples from an in-memory copy of it, loaded
    from the database when the study is opened and written through on every change. Each
    ask, tell or added trial is then one storage transaction (a trial is written whole:
    its params, kind and batch together), and reading the trials back costs no SQL. Optuna's
    RDB storage would otherwise re-read the running trials from the database on every
    sample and write each param in its own transaction; on a search with many trials in
    flight that CPU, not the LM, set the pace. Only the coordinator holding the job's
    lease writes the study, so the copy and the database cannot drift; a trial number that
    differs between them is an error.

    ``attrs`` (job, program, settings ...) are written once as user attributes of the
    study and of its full-evaluation companion (:func:`full_study_name`). A trial's readable
    attributes are written with it once the real candidates are in place; for the trials
    asked before (:meth:`use`), on a writer thread while they are evaluated, and
    :meth:`tell` waits for them. The companion is a copy of the main study's baseline and
    full trials, filled in again on the first :meth:`state` of a resumed search, so a crash
    between the two writes loses nothing.
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
        self.study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True
        )
        """The study as stored (what optuna-dashboard reads); TPE samples from :attr:`_mem`."""
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        self._mem = optuna.create_study(sampler=sampler, direction="maximize")
        self.n_startup_trials = 10
        self._synced = False
        self._ids: dict[int, int] = {}
        """Trial number -> the trial's id in the job database."""
        self._pending: dict[int, Future[None] | None] = {}
        """Trials whose readable attributes are written (None) or being written (a future)."""
        self._storage, self._attrs = storage, dict(attrs or {})
        self._rows = _TrialRows(storage.engine)
        self._full: Future[Any] | None = None
        self._load()

    def _load(self) -> None:
        """Copy the stored trials into the in-memory study, in order (their numbers match)."""
        optuna = _optuna()
        state = optuna.trial.TrialState
        for t in self._storage.get_all_trials(self.study._study_id, deepcopy=False):
            if t.state == state.WAITING or (t.state == state.RUNNING and not self._complete(t)):
                # Killed while it was being asked: never evaluated, and it cannot be. Failed,
                # it counts for nothing and TPE ignores it; the search asks another.
                self._storage.set_trial_state_values(t._trial_id, state.FAIL)
                t = copy.copy(t)
                t.state = state.FAIL
            self._mem._storage.create_new_trial(self._mem._study_id, template_trial=t)
            self._ids[t.number] = t._trial_id

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
                if pending is not None:
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
        for t in self._mem.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self._describe(t.number, trial_kind(t) or TrialKind.MINIBATCH, dict(t.params))

    def _complete(self, trial: Any) -> bool:
        """Whether a trial has every parameter (one killed while being asked may have none)."""
        return set(trial.params) == set(self.space.distributions())

    def _store(self, trial: Any) -> int:
        """Write ``trial`` (a FrozenTrial) to the stored study, whole; its number."""
        trial_id, stored = self._rows.add(self.study._study_id, trial)
        number = len(self._ids)
        if stored != number:
            raise StorageError(
                f"study {self.study.study_name} was written by another process: trial {stored} "
                f"in the database, {number} here"
            )
        self._ids[number] = trial_id
        return number

    def ask(self, kind: str, batch: int, params: dict[str, Any] | None = None) -> Any:
        """A new trial (its params fixed when given), tagged with its kind and batch."""
        optuna = _optuna()
        if params is not None:
            self._mem.enqueue_trial(params)
        trial = self._mem.ask(self.space.distributions())
        tag = {"kind": kind, "batch": batch}
        trial.set_user_attr(_ATTR, tag)
        readable = {} if self.space.placeholder else self._readable(kind, trial.params)
        self._store(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.RUNNING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={_ATTR: tag, **readable},
            )
        )
        if readable:
            self._pending[trial.number] = None
        return trial

    def _describe(self, number: int, kind: str, params: dict[str, Any]) -> None:
        """Write a trial's readable attributes on the writer thread; :meth:`tell` waits for them."""
        attrs, trial_id = self._readable(kind, params), self._ids[number]
        self._pending[number] = _writer().submit(self._rows.set_attrs, trial_id, attrs)

    def _readable(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        # Separate keys, because optuna-dashboard's trial table makes a column of each.
        out: dict[str, Any] = {"kind": kind}
        if not self.space.placeholder:
            out.update(self.space.describe(params))
        return out

    def tell(self, number: int, score: float) -> None:
        """Finish trial ``number`` with ``score``; a baseline or full trial is copied to the companion."""
        trial = self._mem.get_trials(deepcopy=False)[number] if number < len(self._ids) else None
        if trial is None or trial.state.is_finished():  # unknown, or told already (a redelivered result)
            return
        kind = trial_kind(trial) or TrialKind.MINIBATCH
        if number not in self._pending:  # asked in an earlier life of the search: describe it now
            self._describe(number, kind, dict(trial.params))
        pending = self._pending.pop(number)
        if pending is not None:
            try:
                pending.result()
            except Exception:  # readable extras: the search goes on, the operator is told
                log.warning("could not write the attributes of trial %d", number, exc_info=True)
        if not self._rows.finish(self._ids[number], score):
            raise StorageError(f"trial {number} of {self.study.study_name} was finished by another process")
        self._mem.tell(number, score, skip_if_finished=True)
        if kind != TrialKind.MINIBATCH:
            self._copy_full(number, trial.params, score, kind, trial_batch(trial))

    def add_full(self, params: dict[str, Any], score: float, batch: int) -> None:
        """Record a full-valset evaluation as a completed trial (as DSPy does), and in the companion."""
        optuna = _optuna()
        trial = optuna.trial.create_trial(
            params=params,
            distributions=self.space.distributions(),
            value=score,
            user_attrs={
                _ATTR: {"kind": TrialKind.FULL, "batch": batch},
                **self._readable(TrialKind.FULL, params),
            },
        )
        number = self._store(trial)
        self._pending[number] = None
        self._mem.add_trial(trial)
        self._copy_full(number, params, score, TrialKind.FULL, batch)

    def _copy_full(self, number: int, params: dict[str, Any], score: float, kind: str, batch: int) -> None:
        optuna = _optuna()
        self._rows.add(
            self.full._study_id,
            optuna.trial.create_trial(
                params=params,
                distributions=self.space.distributions(),
                value=score,
                user_attrs={"search_trial": number, "batch": batch, **self._readable(kind, params)},
            ),
        )

    def sync_full(self) -> int:
        """Copy the main study's baseline and full trials the companion is missing; how many."""
        optuna = _optuna()
        have = {t.user_attrs.get("search_trial") for t in self.full.get_trials(deepcopy=False)}
        added = 0
        for t in self._mem.get_trials(deepcopy=False):
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
        """Rebuild the search bookkeeping from the trials (the in-memory copy of the stored ones)."""
        optuna = _optuna()
        if not self._synced and not self.space.placeholder:
            self.sync_full()  # a resumed search: a crash may have come between the two writes
            self._synced = True
        done, running = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING
        st = SearchState()
        for t in self._mem.get_trials(deepcopy=False):
            kind = trial_kind(t)
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
        return list(self._mem.get_trials(deepcopy=False))
