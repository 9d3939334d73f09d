"""The lift plot: cumulative lift over units with its confidence sequence, the decision marked.

matplotlib is imported here only (``pip install 'dmipro[bench]'`` installs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dmipro._imports import guarded
from dmipro.errors import ExperimentError

if TYPE_CHECKING:
    from dmipro.ab.experiment import Experiment

__all__ = ["plot_lift"]


def plot_lift(exp: Experiment, out: str | Path) -> dict[str, Any]:
    """Write ``out`` (PNG) and return ``{"path", "units", "decision", "decided_at"}``."""
    with guarded(extra="bench", purpose="plotting (with matplotlib)"):
        import matplotlib

        matplotlib.use("Agg")  # no display: the plot is a file
        import matplotlib.pyplot as plt
    data, path = exp.path()
    if path.diff.size == 0:
        raise ExperimentError(f"experiment {exp.name!r} has no outcomes to plot yet")
    result = exp.analyze()
    units = np.arange(1, path.diff.size + 1)
    low = np.where(np.isfinite(path.ci_low), path.ci_low, np.nan)
    high = np.where(np.isfinite(path.ci_high), path.ci_high, np.nan)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.fill_between(units, low, high, color="tab:blue", alpha=0.2,
                    label=f"{1 - exp.alpha:.0%} confidence sequence")
    ax.plot(units, path.diff, color="tab:blue", lw=1.5, label="lift (treatment - control)")
    ax.axhline(0.0, color="black", lw=0.8)
    mde = exp.settings.get("mde")
    if mde:
        for y in (-mde, mde):
            ax.axhline(y, color="grey", lw=0.8, ls=":")
    decided = result.get("decided_at")
    if decided:
        ax.axvline(decided, color="tab:red", ls="--", lw=1.2)
        ax.annotate(f"decision: {result['decision']}\nat {decided} units",
                    xy=(decided, path.diff[decided - 1]), xytext=(8, 12), textcoords="offset points",
                    color="tab:red", fontsize=9)
    planned = result.get("planned_units")
    if planned and planned <= units[-1] * 1.5:
        ax.axvline(planned, color="grey", ls="-.", lw=0.8, label=f"planned size ({planned})")
    finite = np.concatenate(
        [low[np.isfinite(low)], high[np.isfinite(high)], path.diff[np.isfinite(path.diff)]])
    if finite.size:
        span = np.quantile(np.abs(finite), 0.98)
        ax.set_ylim(-1.2 * span - 1e-9, 1.2 * span + 1e-9)
    ax.set_xlabel("units")
    ax.set_ylabel(f"lift in {exp.metric}")
    ax.set_title(f"{exp.name}: {exp.treatment.spec} vs {exp.control.spec} - decision: {result['decision']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target)
    plt.close(fig)
    return {"path": str(target), "units": int(units[-1]), "decision": result["decision"],
            "decided_at": decided}
