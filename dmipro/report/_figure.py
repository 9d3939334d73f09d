"""The report figure: scores per trial, best so far, which choices mattered, cost per phase.

matplotlib comes with the ``bench`` extra and is imported only when a figure is drawn.
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Any

from dmipro._imports import guarded
from dmipro.report._collect import PHASES, fmt_cost

__all__ = ["figure", "render_png"]

_KIND_STYLE = {
    "minibatch": {"color": "#4c72b0", "marker": "o", "label": "minibatch trial"},
    "full": {"color": "#dd8452", "marker": "D", "label": "full-valset evaluation"},
    "baseline": {"color": "#555555", "marker": "s", "label": "baseline (full valset)"},
}
_PHASE_COLORS = {"bootstrap": "#4c72b0", "propose": "#dd8452", "search": "#55a868", "other": "#b0b0b0"}


# -- the figure ---------------------------------------------------------------------
def _pyplot() -> Any:
    with guarded(extra="bench", purpose="dmipro report (drawn with matplotlib)"):
        import matplotlib

        matplotlib.use("Agg")  # no display: the report is a file
        import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.titleweight": "bold",
            "axes.titlelocation": "left",
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": "#e6e6e6",
            "grid.linewidth": 0.8,
            "legend.frameon": False,
        }
    )
    return plt


def _n(trials: int) -> str:
    return f"{trials} trial" if trials == 1 else f"{trials} trials"


def _end_s(data: dict[str, Any]) -> float:
    """Seconds from the job's start to its last trial (or the run's wall time when longer)."""
    times = [t["t_s"] for t in data["trials"] if t["t_s"] is not None]
    return float(max(times + [data["total"]["wall_s"] or 0.0]))


def _fmt_count(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else f"{n:.0f}"


def _draw_scores(ax: Any, data: dict[str, Any], ylim: tuple[float, float]) -> None:
    ax.set_title("Scores per trial")
    for kind in ("minibatch", "full", "baseline"):
        pts = [t for t in data["trials"] if t["kind"] == kind]
        if pts:
            style = _KIND_STYLE[kind]
            ax.scatter(
                [t["trial"] for t in pts],
                [t["score"] for t in pts],
                s=34 if kind == "minibatch" else 46,
                c=style["color"],
                marker=style["marker"],
                label=style["label"],
                zorder=3,
                alpha=0.85 if kind == "minibatch" else 1.0,
                edgecolors="white",
                linewidths=0.6,
            )
    if data["baseline_score"] is not None:
        ax.axhline(data["baseline_score"], color="#555555", ls="--", lw=1, zorder=2)
        ax.annotate(
            f"baseline {data['baseline_score']:.1f}",
            xy=(1.0, data["baseline_score"]),
            xycoords=("axes fraction", "data"),
            xytext=(-2, 3),
            textcoords="offset points",
            ha="right",
            va="bottom",
            color="#555555",
            fontsize=8,
        )
    steps = data["best_so_far"]
    if steps:
        last = max(t["trial"] for t in data["trials"])
        xs = [s["trial"] for s in steps] + [last]
        ys = [s["score"] for s in steps] + [steps[-1]["score"]]
        ax.step(
            xs, ys, where="post", color="#c44e52", lw=1.8, label="best full-valset (dmipro's pick)", zorder=4
        )
    if not data["trials"]:
        ax.text(0.5, 0.5, "no trials yet", transform=ax.transAxes, ha="center", color="#888888")
    ax.set_xlabel("trial")
    ax.set_ylabel("score")
    ax.set_ylim(*ylim)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=8)


def _draw_best_over_time(ax: Any, data: dict[str, Any], ylim: tuple[float, float], xmax: float) -> None:
    ax.set_title("Best so far over time")
    timed = [t for t in data["trials"] if t["t_s"] is not None]
    mb = sorted((t for t in timed if t["kind"] == data["search_kind"]), key=lambda t: t["t_s"])
    if mb and data["search_kind"] == "minibatch":
        best, xs, ys = -math.inf, [], []
        for t in mb:
            best = max(best, t["score"])
            xs.append(t["t_s"])
            ys.append(best)
        ax.step(xs, ys, where="post", color="#4c72b0", lw=1.2, ls=":", label="best minibatch score")
    steps = [s for s in data["best_so_far"] if s["t_s"] is not None]
    if steps:
        end = _end_s(data)
        xs = [s["t_s"] for s in steps] + [end]
        ys = [s["score"] for s in steps] + [steps[-1]["score"]]
        ax.step(xs, ys, where="post", color="#c44e52", lw=1.8, label="best full-valset (dmipro's pick)")
        ax.scatter([s["t_s"] for s in steps], [s["score"] for s in steps], color="#c44e52", s=18, zorder=3)
        ax.annotate(
            f"{steps[-1]['score']:.1f}",
            xy=(xs[-1], ys[-1]),
            xytext=(0, 4),
            textcoords="offset points",
            ha="right",
            color="#c44e52",
            fontsize=8,
            fontweight="bold",
        )
    else:
        ax.text(0.5, 0.5, "no full-valset evaluation yet", transform=ax.transAxes, ha="center", color="#888")
    if data["baseline_score"] is not None:
        ax.axhline(data["baseline_score"], color="#555555", ls="--", lw=1)
    ax.set_xlabel("seconds since the job started")
    ax.set_ylabel("score")
    ax.set_ylim(*ylim)
    ax.set_xlim(0, xmax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=8)


def _draw_choices(ax: Any, data: dict[str, Any]) -> None:
    ax.set_title("Which choices mattered")
    imp = data["importance"]
    labels = list(data["choices"])
    if not labels:
        ax.text(0.5, 0.5, "no scored search trials yet", transform=ax.transAxes, ha="center", color="#888")
        ax.set_axis_off()
        return
    values = [imp["params"].get(label, 0.0) for label in labels] if imp["params"] else None
    ys = list(range(len(labels)))[::-1]
    if values is not None:
        ax.barh(ys, values, color="#8172b3", height=0.45)
        ax.set_xlim(0, 1.45)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xlabel(f"importance (fANOVA, seed 0, {imp['trials']} {data['search_kind']} trials)")
    else:
        ax.set_xlim(0, 1.45)
        ax.set_xticks([])
        ax.set_xlabel("importance: not computed")
        ax.text(
            0.02,
            0.98,
            textwrap.fill(imp["note"] or "", 70),
            transform=ax.transAxes,
            fontsize=7.5,
            color="#a33",
            va="top",
        )
    ax.set_ylim(-0.7, len(labels) - 0.1)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.grid(axis="y", visible=False)
    for y, label in zip(ys, labels, strict=True):
        ranked = sorted(data["choices"][label], key=lambda c: -c["mean_score"])
        top = ranked[0]
        worst = ranked[-1]
        x = values[labels.index(label)] if values is not None else 0.0
        what = "instruction" if label.endswith("instruction") else "set"
        ax.text(
            x + 0.02,
            y,
            f"best: {what} #{top['choice']}, mean {top['mean_score']:.1f} ({_n(top['trials'])})\n"
            f"worst: {what} #{worst['choice']}, mean {worst['mean_score']:.1f} ({_n(worst['trials'])})",
            va="center",
            fontsize=7.5,
            color="#333333",
        )


def _draw_phases(ax: Any, data: dict[str, Any]) -> None:
    ax.set_title("LM calls, tokens, cost and wall time per phase")
    phases = data["phases"]
    if not phases:
        ax.text(0.5, 0.5, "no phase finished yet", transform=ax.transAxes, ha="center", color="#888")
        ax.set_axis_off()
        return
    total = data["total"]
    rows = [
        ("LM calls", "lm_calls", _fmt_count(total["lm_calls"])),
        ("tokens", "tokens", _fmt_count(total["tokens"])),
        ("cost", "cost_usd", fmt_cost(total["cost_usd"])),
        ("wall time", "wall_s", f"{total['wall_s']:.2f} s"),
    ]
    ys = list(range(len(rows)))[::-1]
    # Time outside the three phases (opening the study, saving the program) is shown as its own part.
    outside = max(0.0, (total["wall_s"] or 0.0) - sum(p["wall_s"] for p in phases.values()))
    for y, (_, key, _) in zip(ys, rows, strict=True):
        values = {name: (phases[name][key] or 0.0) if name in phases else 0.0 for name in PHASES}
        values["other"] = outside if key == "wall_s" else 0.0
        whole = sum(values.values())
        left = 0.0
        for name in (*PHASES, "other"):
            share = values[name] / whole if whole else 0.0
            if share <= 0:
                continue
            ax.barh(y, share, left=left, color=_PHASE_COLORS[name], height=0.6, edgecolor="white")
            if share > 0.09:
                ax.text(
                    left + share / 2, y, f"{share:.0%}", ha="center", va="center", color="white", fontsize=8
                )
            left += share
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{label}\n{shown}" for label, _, shown in rows])
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_xlabel("share of the run")
    ax.grid(axis="y", visible=False)
    handles = [
        ax.bar(
            0, 0, color=_PHASE_COLORS[name], label=name + (" (resumed)" if phases[name]["resumed"] else "")
        )
        for name in PHASES
        if name in phases
    ]
    if outside > 0:
        handles.append(ax.bar(0, 0, color=_PHASE_COLORS["other"], label="outside the phases"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=4, fontsize=8)


def _ylim(reports: list[dict[str, Any]]) -> tuple[float, float]:
    scores = [t["score"] for d in reports for t in d["trials"]]
    if not scores:
        return (0.0, 100.0)
    lo, hi = min(scores), max(scores)
    pad = max(2.0, (hi - lo) * 0.08)
    top = 100.0 if hi <= 100 and hi + pad >= 100 else hi + pad
    return (max(0.0, lo - pad) if lo >= 0 else lo - pad, top)


def _headline(data: dict[str, Any]) -> str:
    parts = [f"{data['job_id']}  ({data['state']})"]
    if data["baseline_score"] is not None and data["best_score"] is not None:
        parts.append(
            f"baseline {data['baseline_score']:.2f} → best {data['best_score']:.2f} "
            f"({data['best_score'] - data['baseline_score']:+.2f})"
        )
    total = data["total"]
    parts.append(
        f"{len(data['trials'])} trials · {total['lm_calls']} LM calls · {_fmt_count(total['tokens'])} tokens"
        f" · {fmt_cost(total['cost_usd'])} · {total['wall_s']:.1f} s"
    )
    return "   ".join(parts)


def figure(reports: list[dict[str, Any]]) -> Any:
    """The matplotlib figure: a 2×2 grid for one job, one row of four panels per job for two.

    Side by side, the score and time axes are shared, so the rows compare at a glance.
    """
    plt = _pyplot()
    ylim = _ylim(reports)
    xmax = max(_end_s(d) for d in reports) * 1.04 or 1.0
    if len(reports) == 1:
        fig, axes = plt.subplots(2, 2, figsize=(13, 9.2), gridspec_kw={"hspace": 0.62, "wspace": 0.36})
        rows = [[axes[0][0], axes[0][1], axes[1][0], axes[1][1]]]
        fig.suptitle(_headline(reports[0]), x=0.04, ha="left", fontsize=11, fontweight="bold")
        fig.subplots_adjust(left=0.12, right=0.97, top=0.92, bottom=0.12)
    else:
        fig, grid = plt.subplots(
            len(reports), 4, figsize=(22, 5.0 * len(reports)), gridspec_kw={"hspace": 0.85, "wspace": 0.45}
        )
        rows = [list(r) for r in grid]
        fig.subplots_adjust(left=0.06, right=0.98, top=0.86, bottom=0.13)
        fig.suptitle(
            "  vs  ".join(d["job_id"] for d in reports), x=0.02, ha="left", fontsize=12, fontweight="bold"
        )
    trials_max = max([t["trial"] for d in reports for t in d["trials"]] + [1])
    for data, (a, b, c, d) in zip(reports, rows, strict=True):
        _draw_scores(a, data, ylim)
        a.set_xlim(0.3, trials_max + 0.7)
        _draw_best_over_time(b, data, ylim, xmax)
        _draw_choices(c, data)
        _draw_phases(d, data)
        if len(reports) > 1:
            a.annotate(
                _headline(data),
                xy=(0, 1.14),
                xycoords="axes fraction",
                fontsize=10,
                fontweight="bold",
                color="#222222",
            )
    return fig


def render_png(reports: list[dict[str, Any]], *, dpi: int = 110) -> bytes:
    """The report figure as PNG bytes."""
    plt = _pyplot()
    fig = figure(reports)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()
