"""Experiments: two registry versions, hashed assignment, batched outcomes, anytime-valid analysis.

An :class:`Experiment` is a snapshot of its database row, refreshed in the background;
``assign`` and ``record`` never touch the database on the caller's thread. Assignment
hashes ``(salt, unit)`` with BLAKE2b: the salt is drawn once when the experiment is
created and stored with it, so every process on every machine, before and after a
restart, puts a unit in the same arm, and a new experiment of the same name reshuffles.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Integer, cast, func, select, update
from sqlalchemy.exc import IntegrityError

from dmipro.ab import analysis, stats
from dmipro.ab._models import ExperimentRow, OutcomeRow
from dmipro.ab._recorder import recorder_for
from dmipro.ab.analysis import DEFAULT_GUARDRAILS
from dmipro.config import get_settings
from dmipro.db import session_scope
from dmipro.errors import ExperimentError
from dmipro.events import bus
from dmipro.registry._models import NameRow
from dmipro.registry.names import format_spec, parse_spec, validate_name
from dmipro.registry.registry import Registry
from dmipro.registry.values import default_actor

if TYPE_CHECKING:
    import dspy

__all__ = [
    "ARMS",
    "DECISIONS",
    "DEFAULT_GUARDRAILS",
    "Arm",
    "Experiment",
    "create",
    "get",
    "list_experiments",
]

ARMS = ("control", "treatment")
DECISIONS = ("treatment", "control", "continue", "no_difference")
STATES = ("running", "stopped", "promoted")
MODES = ("sequential", "fixed")
GUARDRAIL_METRICS = ("latency_ms", "cost_usd", "tokens", "error_rate")
REFRESH_S = 5.0
"""How often a process re-reads an experiment's state (stopped? promoted? rolled back?)."""
_MAX_UNIT = 256


def _unit_hash(salt: str, unit: str) -> float:
    digest = hashlib.blake2b(f"{salt}\x1f{unit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ExperimentError(f"an outcome must be a finite number, got {value!r}") from None


def _unit(unit_id: object) -> str:
    unit = str(unit_id)
    if not unit or len(unit) > _MAX_UNIT:
        raise ExperimentError(f"a unit id must be 1-{_MAX_UNIT} characters, got {len(unit)}")
    return unit


def outcome_row(*, experiment: str | None, arm: str, program: str, version: int, unit_id: object,
                value: float | bool, latency_ms: float | None, tokens: int | None, cost_usd: float | None,
                error: bool) -> dict[str, Any]:
    """One checked outcome row, as the recorder writes it (experiments and the production monitor alike)."""
    number = _number(value)
    if not math.isfinite(number):
        raise ExperimentError(f"an outcome must be a finite number, got {value!r}")
    for label, extra in (("latency_ms", latency_ms), ("tokens", tokens), ("cost_usd", cost_usd)):
        if extra is not None and (not math.isfinite(_number(extra)) or _number(extra) < 0):
            raise ExperimentError(f"{label} must be a finite non-negative number, got {extra!r}")
    return {
        "experiment": experiment, "arm": arm, "program": program, "version": version,
        "unit_id": _unit(unit_id), "value": number,
        "latency_ms": None if latency_ms is None else float(latency_ms),
        "tokens": None if tokens is None else int(tokens),
        "cost_usd": None if cost_usd is None else float(cost_usd),
        "error": bool(error), "at": time.time(),
    }


_programs_lock = threading.Lock()
_programs: dict[tuple[str, str, int], Any] = {}


def _load_program(url: str, program: str, version: int) -> dspy.Module:
    key = (url, program, version)
    with _programs_lock:
        cached = _programs.get(key)
    if cached is not None:
        return cached
    loaded = Registry(url).load(format_spec(program, version))
    with _programs_lock:
        return _programs.setdefault(key, loaded)


@dataclass(frozen=True)
class Arm:
    """What a unit is served: ``name`` (``"control"`` or ``"treatment"``) and the registry ``version``.

    After an experiment, units get the deployed version; ``name`` is then the arm that
    version was, or ``"production"`` if it was neither.
    """

    name: str
    version: int
    program_name: str
    url: str = field(repr=False)

    @property
    def spec(self) -> str:
        """``program@version``."""
        return format_spec(self.program_name, self.version)

    @property
    def program(self) -> dspy.Module:
        """The version as a ready ``dspy.Module``, loaded once per process and shared (do not mutate)."""
        return _load_program(self.url, self.program_name, self.version)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.name, "version": self.version, "spec": self.spec}


class Experiment:
    """An A/B experiment between two versions of one registered program.

    Safe to share between threads. ``assign`` and ``record`` are cheap and never write to
    the database on the caller's thread; ``analyze``, ``stop`` and ``promote`` do.
    """

    def __init__(self, row: ExperimentRow, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._apply(row)
        self._deployed: int | None = None
        self._refreshed = time.monotonic()
        self._recorder = recorder_for(url)
        self._recorder.watch(self)

    # -- state --------------------------------------------------------------------------
    def _apply(self, row: ExperimentRow) -> None:
        self.name = row.name
        self.program_name = row.program
        self.control = Arm("control", row.control_version, row.program, self.url)
        self.treatment = Arm("treatment", row.treatment_version, row.program, self.url)
        self.split = float(row.split)
        self.metric = row.metric
        self.alpha = float(row.alpha)
        self.salt = row.salt
        self.settings: dict[str, Any] = dict(row.settings)
        self.state = row.state
        self.decision = row.decision
        self.promoted_version = row.promoted_version
        self.created_at = row.created_at
        self.stopped_at = row.stopped_at

    def refresh(self) -> Experiment:
        """Re-read the experiment's state and the program's deployed version from the database."""
        with session_scope(self.url) as s:
            row = s.get(ExperimentRow, self.name)
            if row is None:
                raise ExperimentError(f"experiment {self.name!r} no longer exists")
            name_row = s.get(NameRow, self.program_name)
            deployed = None if name_row is None else name_row.deployed_version
            with self._lock:
                self._apply(row)
                self._deployed = deployed
                self._refreshed = time.monotonic()
        return self

    def _background(self) -> None:
        if time.monotonic() - self._refreshed >= REFRESH_S:
            self.refresh()

    @property
    def running(self) -> bool:
        """Whether units are still split between the arms."""
        return self.state == "running"

    # -- the hot path -------------------------------------------------------------------
    def _serving(self) -> Arm:
        """The arm served to everyone once the experiment is over: the deployed version."""
        version = self._deployed
        if version is None:
            version = self.promoted_version or self.control.version
        if version == self.treatment.version:
            return self.treatment
        if version == self.control.version:
            return self.control
        return Arm("production", version, self.program_name, self.url)

    def assign(self, unit_id: object) -> Arm:
        """The arm of ``unit_id``: a hash of (experiment salt, unit), the same in every process.

        After the experiment is stopped or promoted every unit gets the deployed version.
        """
        unit = _unit(unit_id)
        if not self.running:
            return self._serving()
        arm = self.treatment if _unit_hash(self.salt, unit) < self.split else self.control
        rate = float(self.settings.get("assign_sample_rate", 0.0))
        if rate > 0 and _unit_hash(self.salt + "/sample", unit) < rate:
            bus.emit("dspy.ab.assign", experiment=self.name, unit_id=unit, arm=arm.name,
                     version=arm.version, program=self.program_name)
        return arm

    def record(
        self,
        unit_id: object,
        value: float | bool,
        *,
        latency_ms: float | None = None,
        tokens: int | None = None,
        cost_usd: float | None = None,
        error: bool = False,
    ) -> None:
        """Record one outcome of ``unit_id`` (binary 0/1 or continuous) for the arm it is assigned.

        Buffered and written in batches by a background thread; :meth:`flush` writes now,
        and everything left is written at interpreter exit. After the experiment, outcomes
        are recorded for the deployed version (the production loop, see ``dmipro.ab.monitor``).
        """
        unit = _unit(unit_id)
        if self.running:
            arm = self.treatment if _unit_hash(self.salt, unit) < self.split else self.control
            stored_arm = arm.name
        else:
            arm = self._serving()
            stored_arm = "production"
        row = outcome_row(experiment=self.name, arm=stored_arm, program=self.program_name,
                          version=arm.version, unit_id=unit, value=value, latency_ms=latency_ms,
                          tokens=tokens, cost_usd=cost_usd, error=error)
        self._recorder.add(row)
        bus.emit("dspy.ab.outcome", experiment=self.name, arm=stored_arm, version=arm.version,
                 program=self.program_name, metric=self.metric, value=row["value"], latency_ms=latency_ms,
                 tokens=tokens, cost_usd=cost_usd, error=bool(error))

    def flush(self) -> int:
        """Write every outcome this process has buffered (for any experiment on this database) now."""
        return self._recorder.flush()

    def close(self) -> None:
        """Flush and stop this process's background writer (it restarts on the next ``record``)."""
        self._recorder.close(attempts=3)

    # -- analysis -----------------------------------------------------------------------
    def units(self) -> dict[str, Any]:
        """Per-unit data in arrival order: arm, mean outcome and guardrail means (numpy arrays)."""
        self.flush()
        query = (
            select(
                OutcomeRow.arm,
                OutcomeRow.unit_id,
                func.min(OutcomeRow.id).label("first"),
                func.avg(OutcomeRow.value),
                func.avg(OutcomeRow.latency_ms),
                func.avg(OutcomeRow.cost_usd),
                func.avg(OutcomeRow.tokens),
                func.avg(cast(OutcomeRow.error, Integer)),
                func.count(),
            )
            .where(OutcomeRow.experiment == self.name, OutcomeRow.arm.in_(ARMS))
            .group_by(OutcomeRow.arm, OutcomeRow.unit_id)
            .order_by("first")
        )
        with session_scope(self.url) as s:
            rows = s.execute(query).all()

        def column(i: int) -> np.ndarray[Any, np.dtype[np.float64]]:
            return np.array([np.nan if r[i] is None else float(r[i]) for r in rows], dtype=np.float64)

        return {
            "treated": np.array([r[0] == "treatment" for r in rows], dtype=bool),
            "value": column(3),
            "latency_ms": column(4),
            "cost_usd": column(5),
            "tokens": column(6),
            "error_rate": column(7),
            "outcomes": int(sum(int(r[8]) for r in rows)),
        }

    def path(self) -> tuple[dict[str, Any], stats.SequentialPath]:
        """The per-unit data and the mSPRT path over it (for plots and custom analyses)."""
        data = self.units()
        return data, analysis.sequential(data, alpha=self.alpha, settings=self.settings)

    def analyze(self) -> dict[str, Any]:
        """The experiment's statistics and decision now; safe to call after every unit.

        Returns per arm ``n``, ``mean``, ``ci_low``, ``ci_high``; ``lift`` (treatment minus
        control) with ``lift_ci_low``/``lift_ci_high``; ``p_value``; ``decision`` (one of
        ``treatment``, ``control``, ``continue``, ``no_difference``); ``guardrails``; and
        ``srm_p_value``. In the default sequential mode the p-value and intervals are
        anytime-valid (see :mod:`dmipro.ab.stats`).
        """
        out: dict[str, Any] = {
            "name": self.name,
            "program": self.program_name,
            "state": self.state,
            "mode": self.settings.get("mode", "sequential"),
            "metric": self.metric,
            "alpha": self.alpha,
            "split": self.split,
        }
        try:
            out.update(analysis.analyze(self.units(), alpha=self.alpha, split=self.split, metric=self.metric,
                                        settings=self.settings))
        except ValueError as exc:
            raise ExperimentError(f"experiment {self.name!r}: {exc}") from exc
        out["control"]["version"] = self.control.version
        out["treatment"]["version"] = self.treatment.version
        self._store_decision(out)
        return out

    def _store_decision(self, out: dict[str, Any]) -> None:
        """Persist a changed decision; emit ``dspy.ab.decision`` once per change, from one process."""
        decision = out["decision"]
        if decision == self.decision:
            return
        with session_scope(self.url) as s:
            result: Any = s.execute(
                update(ExperimentRow)
                .where(ExperimentRow.name == self.name,
                       (ExperimentRow.decision != decision) | ExperimentRow.decision.is_(None))
                .values(decision=decision, updated_at=time.time())
            )
            changed = result.rowcount
        self.decision = decision
        if changed:
            bus.emit("dspy.ab.decision", experiment=self.name, program=self.program_name, decision=decision,
                     lift=out.get("lift"), lift_ci_low=out.get("lift_ci_low"),
                     lift_ci_high=out.get("lift_ci_high"), p_value=out.get("p_value"), units=out["units"],
                     control_version=self.control.version, treatment_version=self.treatment.version,
                     srm_p_value=out.get("srm_p_value"), vetoed_by=out.get("vetoed_by"))

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self) -> dict[str, Any]:
        """Stop splitting units (everyone gets the deployed version) and return the final analysis."""
        self.flush()
        now = time.time()
        with session_scope(self.url) as s:
            s.execute(update(ExperimentRow).where(ExperimentRow.name == self.name,
                                                  ExperimentRow.state == "running")
                      .values(state="stopped", stopped_at=now, updated_at=now))
        self.refresh()
        return self.analyze()

    def promote(self, arm: str | None = None, *, actor: str | None = None) -> dict[str, Any]:
        """Deploy the winning version through the registry (``dspy.signature.deployed``) and stop.

        ``arm`` (``"control"`` or ``"treatment"``) overrides the decision; without it the
        decision must name a winner. Returns ``{"experiment", "arm", "version", "deployed"}``.
        """
        if self.state == "running":
            self.flush()
            # Decide on the data recorded while units were split, then stop the split.
            result = self.analyze()
            decision = result["decision"]
        else:
            decision = self.decision or self.analyze()["decision"]
        chosen = arm or decision
        if chosen not in ARMS:
            raise ExperimentError(
                f"experiment {self.name!r} has no winner to promote (decision: {decision}); "
                "keep it running, or name the arm: promote('treatment')"
            )
        winner = self.control if chosen == "control" else self.treatment
        who = actor or f"{default_actor()} (experiment {self.name})"
        dep = Registry(self.url).deploy(self.program_name, winner.version, actor=who[:200])
        now = time.time()
        with session_scope(self.url) as s:
            s.execute(update(ExperimentRow).where(ExperimentRow.name == self.name).values(
                state="promoted", promoted_version=winner.version, updated_at=now,
                stopped_at=func.coalesce(ExperimentRow.stopped_at, now)))
        self.refresh()
        return {"experiment": self.name, "arm": winner.name, "version": winner.version,
                "spec": winner.spec, "deployed": dep is not None}

    def to_json(self) -> dict[str, Any]:
        """The experiment's definition and state, JSON-ready."""
        return {
            "name": self.name,
            "program": self.program_name,
            "control": self.control.to_json(),
            "treatment": self.treatment.to_json(),
            "split": self.split,
            "metric": self.metric,
            "alpha": self.alpha,
            "state": self.state,
            "decision": self.decision,
            "promoted_version": self.promoted_version,
            "settings": self.settings,
            "created_at": self.created_at,
            "stopped_at": self.stopped_at,
        }

    def __repr__(self) -> str:
        return (f"Experiment({self.name!r}, control={self.control.spec}, treatment={self.treatment.spec}, "
                f"state={self.state})")


# -- module functions --------------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: weakref.WeakValueDictionary[tuple[str, str], Experiment] = weakref.WeakValueDictionary()


def _resolve(registry: Registry, spec: str) -> tuple[str, int]:
    name, version = parse_spec(spec)
    if version is None:
        version = registry.show(name).version  # the deployed version, or a NotFoundError saying so
    else:
        registry.show(format_spec(name, version))
    return name, version


def create(
    name: str,
    control: str,
    treatment: str,
    split: float = 0.5,
    metric: str = "success",
    alpha: float = 0.05,
    *,
    mode: str = "sequential",
    mde: float | None = None,
    baseline: float | None = None,
    power: float = 0.8,
    max_units: int | None = None,
    metric_type: str = "auto",
    guardrails: dict[str, float] | None = None,
    min_n: int = 20,
    assign_sample_rate: float = 0.01,
    url: str | None = None,
) -> Experiment:
    """Create and start an experiment between two versions of one registered program.

    ``control``/``treatment`` are ``NAME@VERSION`` (a bare ``NAME`` for control means its
    deployed version). ``split`` is the treatment's share of units. ``mode`` is
    ``"sequential"`` (anytime-valid, the default) or ``"fixed"`` (one look at the planned
    size: needs ``baseline`` and ``mde``). ``mde`` is the smallest effect worth detecting,
    on the metric's scale; it tunes the sequential test's power and, with ``baseline``,
    gives the planned size (``max_units`` sets it directly). ``guardrails`` maps
    ``latency_ms``/``cost_usd``/``tokens`` (relative) and ``error_rate`` (absolute) to the
    largest tolerated increase (default :data:`DEFAULT_GUARDRAILS`). ``assign_sample_rate``
    is the share of units whose assignment emits ``dspy.ab.assign``.
    """
    validate_name(name)
    db = url or get_settings().effective_database_url
    registry = Registry(db)
    program, control_version = _resolve(registry, control)
    program_t, treatment_version = _resolve(registry, treatment)
    if program != program_t:
        raise ExperimentError(
            f"control {control!r} and treatment {treatment!r} must be versions of one registered program"
        )
    if control_version == treatment_version:
        raise ExperimentError(f"control and treatment are the same version ({program}@{control_version})")
    if isinstance(split, bool) or not isinstance(split, int | float) or not 0 < split < 1:
        raise ExperimentError(f"split must be a fraction strictly between 0 and 1, got {split!r}")
    if not isinstance(alpha, int | float) or not 0 < alpha <= 0.5:
        raise ExperimentError(f"alpha must be in (0, 0.5], got {alpha!r}")
    if not isinstance(metric, str) or not metric or len(metric) > 64:
        raise ExperimentError("metric must be a name of 1-64 characters")
    if mode not in MODES:
        raise ExperimentError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if metric_type not in ("auto", "binary", "continuous"):
        raise ExperimentError(f"metric_type must be auto, binary or continuous, got {metric_type!r}")
    if mde is not None and (not math.isfinite(mde) or mde <= 0):
        raise ExperimentError(f"mde must be a positive effect size, got {mde!r}")
    if not 0 < power < 1:
        raise ExperimentError(f"power must be in (0, 1), got {power!r}")
    if mode == "fixed":
        if baseline is None or mde is None:
            if max_units is None:
                raise ExperimentError("a fixed-horizon experiment needs baseline= and mde= (or max_units=)")
        else:
            try:
                stats.plan(baseline, mde, power=power, alpha=alpha, split=split)
            except ValueError as exc:
                raise ExperimentError(f"cannot plan the experiment: {exc}") from exc
    if max_units is not None and (isinstance(max_units, bool) or max_units < 2 * min_n):
        raise ExperimentError(f"max_units must be at least {2 * min_n}, got {max_units!r}")
    if not isinstance(min_n, int) or min_n < 2:
        raise ExperimentError(f"min_n must be a whole number >= 2, got {min_n!r}")
    if not 0 <= assign_sample_rate <= 1:
        raise ExperimentError(f"assign_sample_rate must be in [0, 1], got {assign_sample_rate!r}")
    rails = dict(DEFAULT_GUARDRAILS if guardrails is None else guardrails)
    for key, value in rails.items():
        if key not in GUARDRAIL_METRICS:
            raise ExperimentError(f"unknown guardrail {key!r}; known: {', '.join(GUARDRAIL_METRICS)}")
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ExperimentError(f"guardrail {key} must be a non-negative tolerance, got {value!r}")
    settings = {
        "mode": mode, "mde": mde, "baseline": baseline, "power": power, "max_units": max_units,
        "metric_type": metric_type, "guardrails": rails, "min_n": min_n,
        "assign_sample_rate": assign_sample_rate,
    }
    if baseline is None:
        del settings["baseline"]  # the plan then uses control's observed rate
    now = time.time()
    row = ExperimentRow(
        name=name, program=program, control_version=control_version, treatment_version=treatment_version,
        split=float(split), metric=metric, alpha=float(alpha), salt=secrets.token_hex(16),
        settings=settings, state="running", decision=None, promoted_version=None,
        created_by=default_actor(), created_at=now, updated_at=now, stopped_at=None,
    )
    try:
        with session_scope(db) as s:
            s.add(row)
    except IntegrityError:
        raise ExperimentError(f"an experiment named {name!r} already exists; pick another name") from None
    return get(name, url=db)


def get(name: str, *, url: str | None = None) -> Experiment:
    """The experiment ``name`` (one shared object per process and database)."""
    db = url or get_settings().effective_database_url
    with _cache_lock:
        cached = _cache.get((db, name))
    if cached is not None:
        return cached
    with session_scope(db) as s:
        row = s.get(ExperimentRow, name)
    if row is None:
        raise ExperimentError(f"no experiment named {name!r}; create one with dmipro.ab.create")
    exp = Experiment(row, db)
    exp.refresh()
    with _cache_lock:
        return _cache.setdefault((db, name), exp)


def list_experiments(*, url: str | None = None) -> builtins.list[Experiment]:
    """Every experiment, newest first."""
    db = url or get_settings().effective_database_url
    with session_scope(db) as s:
        query = select(ExperimentRow.name).order_by(ExperimentRow.created_at.desc())
        names = s.execute(query).scalars().all()
    return [get(n, url=db) for n in names]
