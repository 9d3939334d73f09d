"""The production loop: keep recording the deployed version, and roll it back on a regression.

A :class:`Monitor` records outcomes of whatever version of a program is deployed (the
same ``record`` API as an experiment; an experiment that is over records there too). Its
:meth:`Monitor.check` compares the version's *recent window* (its last ``window``
outcomes) with its *reference window* (its first ``reference`` outcomes, usually those
it earned as the treatment of the experiment that promoted it) with the same mixture
SPRT as experiments, run along the recent window: a regression is declared when the
always-valid p-value falls to ``alpha`` with the recent mean below the reference. It
emits ``dspy.ab.regression``; with ``registry.auto_rollback: true`` in ``dmipro.yaml``
(or ``auto_rollback=True``) it rolls the program back through the registry, otherwise
the event is the alert the subscribers turn into an OTel metric and span event, a New
Relic event and a Langfuse score.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from dmipro.ab import stats
from dmipro.ab._models import ExperimentRow, OutcomeRow
from dmipro.ab._recorder import recorder_for
from dmipro.ab.experiment import REFRESH_S, _load_program, outcome_row
from dmipro.config import get_settings
from dmipro.db import session_scope
from dmipro.errors import DmiproError, ExperimentError
from dmipro.events import bus
from dmipro.registry.names import format_spec, validate_name
from dmipro.registry.registry import Registry
from dmipro.registry.values import default_actor

if TYPE_CHECKING:
    import dspy

__all__ = ["Monitor", "monitor"]


class Monitor:
    """Outcomes of a program's deployed version, and the regression check on them. Thread-safe."""

    def __init__(
        self,
        program: str,
        *,
        url: str | None = None,
        reference: int = 1000,
        window: int = 1000,
        alpha: float = 0.05,
        mde: float | None = None,
        min_n: int = 50,
        auto_rollback: bool | None = None,
        check_every_s: float | None = None,
    ) -> None:
        """``check_every_s`` runs :meth:`check` that often on the background writer thread."""
        validate_name(program)
        if reference < min_n or window < min_n:
            raise ExperimentError(f"reference and window must hold at least min_n={min_n} outcomes")
        self.program_name = program
        self.url = url or get_settings().effective_database_url
        self.reference = reference
        self.window = window
        self.alpha = alpha
        self.mde = mde
        self.min_n = min_n
        self.auto_rollback = auto_rollback
        self.check_every_s = check_every_s
        self.last_check: dict[str, Any] | None = None
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._alerted: set[int] = set()
        self._version = self._read_version()
        self._refreshed = time.monotonic()
        self._recorder = recorder_for(self.url)
        self._recorder.watch(self)

    def _read_version(self) -> int:
        info = Registry(self.url).show(self.program_name)  # NotFoundError when nothing is deployed
        return info.version

    def _background(self) -> None:
        if self.check_every_s is not None and time.monotonic() - self._checked >= self.check_every_s:
            self._checked = time.monotonic()
            self.check()
        elif time.monotonic() - self._refreshed >= REFRESH_S:
            self._version = self._read_version()
            self._refreshed = time.monotonic()

    @property
    def version(self) -> int:
        """The deployed version (re-read every few seconds in the background)."""
        return self._version

    @property
    def program(self) -> dspy.Module:
        """The deployed version as a ready ``dspy.Module`` (cached per process and version)."""
        return _load_program(self.url, self.program_name, self._version)

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
        """Record one outcome of the deployed version (buffered, as ``Experiment.record``)."""
        version = self._version
        row = outcome_row(experiment=None, arm="production", program=self.program_name, version=version,
                          unit_id=unit_id, value=value, latency_ms=latency_ms, tokens=tokens,
                          cost_usd=cost_usd, error=error)
        self._recorder.add(row)
        bus.emit("dspy.ab.outcome", experiment=None, arm="production", version=version,
                 program=self.program_name, value=row["value"], latency_ms=latency_ms, tokens=tokens,
                 cost_usd=cost_usd, error=bool(error))

    def flush(self) -> int:
        """Write the buffered outcomes now."""
        return self._recorder.flush()

    def check(self) -> dict[str, Any]:
        """Compare the deployed version's recent window with its reference window; act on a regression.

        Returns ``program``, ``version``, ``reference``/``recent`` (``n``, ``mean``), ``diff``
        (recent minus reference) with ``ci_low``/``ci_high``, ``p_value``, ``regression``,
        ``action`` (``"rollback"``, ``"alert"`` or None) and ``rolled_back_to``.
        """
        self.flush()
        self._checked = time.monotonic()
        version = self._version = self._read_version()
        self._refreshed = time.monotonic()
        with session_scope(self.url) as s:
            values = np.array(
                s.execute(
                    select(OutcomeRow.value)
                    .where(OutcomeRow.program == self.program_name, OutcomeRow.version == version)
                    .order_by(OutcomeRow.id)
                ).scalars().all(),
                dtype=np.float64,
            )
        ref = values[: self.reference]
        rest = values[self.reference :]
        recent = rest[-self.window :] if rest.size else rest
        out: dict[str, Any] = {
            "program": self.program_name, "version": version,
            "reference": {"n": int(ref.size), "mean": float(ref.mean()) if ref.size else None},
            "recent": {"n": int(recent.size), "mean": float(recent.mean()) if recent.size else None},
            "diff": None, "ci_low": None, "ci_high": None, "p_value": 1.0,
            "regression": False, "action": None, "rolled_back_to": None,
        }
        if ref.size < self.min_n or recent.size < self.min_n:
            out["status"] = "insufficient_data"
            self.last_check = out
            return out
        stream = np.concatenate([ref, recent])
        is_recent = np.arange(stream.size) >= ref.size
        binary = bool(np.isin(stream, (0.0, 1.0)).all())
        path = stats.sequential_path(stream, is_recent, alpha=self.alpha, mde=self.mde, binary=binary,
                                     min_n=self.min_n)
        last = stream.size - 1
        out.update(diff=float(path.diff[last]), ci_low=_finite(path.ci_low[last]),
                   ci_high=_finite(path.ci_high[last]), p_value=float(path.p_value[last]))
        regression = out["p_value"] <= self.alpha and out["ci_high"] is not None and out["ci_high"] < 0
        out["regression"] = regression
        out["status"] = "regression" if regression else "ok"
        if regression:
            self._act(out)
        self.last_check = out
        return out

    def _act(self, out: dict[str, Any]) -> None:
        version = int(out["version"])
        auto = self.auto_rollback if self.auto_rollback is not None else get_settings().registry.auto_rollback
        action = "alert"
        if auto:
            try:
                dep = Registry(self.url).rollback(
                    self.program_name, actor=f"{default_actor()} (regression check)"[:200])
                action = "rollback"
                out["rolled_back_to"] = dep.to_version
                self._version = int(dep.to_version) if dep.to_version is not None else self._version
            except DmiproError as exc:
                out["rollback_error"] = str(exc)
        out["action"] = action
        with self._lock:
            first = version not in self._alerted
            self._alerted.add(version)
        if first or action == "rollback":
            bus.emit("dspy.ab.regression", program=self.program_name, version=version,
                     spec=format_spec(self.program_name, version), action=action,
                     rolled_back_to=out["rolled_back_to"], reference_mean=out["reference"]["mean"],
                     recent_mean=out["recent"]["mean"], diff=out["diff"], ci_low=out["ci_low"],
                     ci_high=out["ci_high"], p_value=out["p_value"], recent_n=out["recent"]["n"],
                     error=out.get("rollback_error"))


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def monitor(name: str, **options: Any) -> Monitor:
    """The production monitor of a registered program, or of the program an experiment ``name`` tested.

    ``options`` are :class:`Monitor`'s (``reference``, ``window``, ``alpha``, ``mde``,
    ``min_n``, ``auto_rollback``, ``check_every_s``, ``url``). With ``check_every_s`` the
    check runs in the background, so an app that records outcomes is watched without more code.
    """
    url = options.pop("url", None) or get_settings().effective_database_url
    with session_scope(url) as s:
        row = s.get(ExperimentRow, name)
        program = row.program if row is not None else name
    return Monitor(program, url=url, **options)
