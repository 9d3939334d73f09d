"""A run report: one figure of a job, from the job database and its Optuna study.

:func:`collect` gathers the numbers (works for a running, failed or finished job: the
trials come from the study, per-phase usage from the job's result or, before it ends,
from its phase checkpoints). :func:`render_png` draws them — scores per trial with the
baseline, dmipro's best so far over time, which instruction and demo choices mattered,
and LM calls, tokens, cost and wall time per phase — for one job, or two side by side.
:func:`render_html` wraps the figure and the tables in one self-contained file.

matplotlib comes with the ``bench`` extra and the importance evaluator (fANOVA) needs
scikit-learn, which comes with it too; both are imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from dmipro.errors import ConfigError, JobNotFoundError
from dmipro.jobs.store import JobStore
from dmipro.teleprompt.search import full_study_name, trial_kind

__all__ = [
    "MIN_IMPORTANCE_TRIALS",
    "collect",
    "figure",
    "render_html",
    "render_png",
    "report",
    "write_report",
]

MIN_IMPORTANCE_TRIALS = 8
"""Below this many scored search trials, importances are noise (fANOVA says 50/50 on one trial)."""

PHASES = ("bootstrap", "propose", "search")
_KIND_STYLE = {
    "minibatch": {"color": "#4c72b0", "marker": "o", "label": "minibatch trial"},
    "full": {"color": "#dd8452", "marker": "D", "label": "full-valset evaluation"},
    "baseline": {"color": "#555555", "marker": "s", "label": "baseline (full valset)"},
}
_PHASE_COLORS = {"bootstrap": "#4c72b0", "propose": "#dd8452", "search": "#55a868", "other": "#b0b0b0"}


# -- the numbers ----------------------------------------------------------------------
def _study(name: str, url: str) -> Any | None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:  # the job has not reached the search yet (or predates the companion)
        return None


def _param_label(name: str, predictors: list[str]) -> str:
    index, _, what = name.partition("_predictor_")
    predictor = predictors[int(index)] if index.isdigit() and int(index) < len(predictors) else index
    return f"{predictor}: {'instruction' if what == 'instruction' else 'demo set'}"


def _importance(trials: list[Any], predictors: list[str]) -> dict[str, Any]:
    """fANOVA importances (seed 0) over the search trials, or a note saying why there are none."""
    import optuna

    out: dict[str, Any] = {
        "evaluator": "fanova",
        "seed": 0,
        "trials": len(trials),
        "params": {},
        "note": None,
    }
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        out["note"] = (
            f"{len(trials)} scored search trials: too few for importances (needs {MIN_IMPORTANCE_TRIALS}); "
            "the mean score per choice is shown instead"
        )
        return out
    if len({t.value for t in trials}) < 2:
        out["note"] = "every search trial scored the same: no choice made a difference"
        return out
    try:
        import sklearn  # noqa: F401  (fANOVA's forest)
    except ImportError:
        out["note"] = "importances need scikit-learn: pip install 'dmipro[bench]'"
        return out
    memory = optuna.create_study(direction="maximize")
    memory.add_trials(trials)
    values = optuna.importance.get_param_importances(
        memory, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    out["params"] = {_param_label(k, predictors): round(float(v), 4) for k, v in values.items()}
    return out


def _choices(trials: list[Any], predictors: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Mean search score per value of each parameter: which instruction / demo set did well."""
    table: dict[str, dict[int, list[float]]] = {}
    for t in trials:
        for name, value in t.params.items():
            table.setdefault(name, {}).setdefault(int(value), []).append(float(t.value))
    return {
        _param_label(name, predictors): [
            {"choice": v, "mean_score": round(sum(s) / len(s), 2), "trials": len(s)}
            for v, s in sorted(by_value.items())
        ]
        for name, by_value in sorted(table.items())
    }


def _phase_numbers(stats: dict[str, Any]) -> dict[str, Any]:
    task, prompt = stats.get("task_lm", {}), stats.get("prompt_lm", {})
    cost_parts = [task.get("cost_usd"), prompt.get("cost_usd")]
    return {
        "task_lm_calls": int(task.get("calls", 0)),
        "prompt_lm_calls": int(prompt.get("calls", 0)),
        "lm_calls": int(task.get("calls", 0)) + int(prompt.get("calls", 0)),
        "tokens": int(task.get("tokens", 0)) + int(prompt.get("tokens", 0)),
        # An unknown price stays unknown: a model litellm cannot price is never counted as free.
        "cost_usd": None if any(c is None for c in cost_parts) else round(sum(cost_parts), 6),
        "wall_s": round(float(stats.get("wall_s", 0.0)), 3),
        "resumed": bool(stats.get("resumed", False)),
    }


def collect(job_id: str, store: JobStore | None = None) -> dict[str, Any]:
    """Every number the report shows for ``job_id`` (JSON-ready)."""
    store = store or JobStore()
    record = store.find(job_id)
    if record is None:
        raise JobNotFoundError(f"no job {job_id!r} in the job database")
    result = record.result or {}
    url = store.url
    study = _study(f"dmipro:{job_id}", url)
    started = record.started_at or record.created_at

    predictors: list[str] = list((result.get("best_candidate") or {}).keys())
    trials: list[dict[str, Any]] = []
    searched: list[Any] = []
    raw = [] if study is None else study.get_trials(deepcopy=False)
    if not predictors:
        predictors = sorted(
            {k.split(".", 1)[0] for t in raw for k in t.user_attrs if k.endswith(".instruction")}
        )
    for t in raw:
        if t.value is None:
            continue
        kind = trial_kind(t) or "minibatch"
        finished = t.datetime_complete.timestamp() if t.datetime_complete else None
        trials.append(
            {
                "trial": t.number + 1,
                "kind": kind,
                "score": float(t.value),
                "t_s": None if finished is None else round(finished - started, 3),
                "params": dict(t.params),
                **{k: v for k, v in t.user_attrs.items() if "." in k},
            }
        )
    full_kinds = ("baseline", "full")
    has_minibatch = any(t["kind"] == "minibatch" for t in trials)
    search_kind = "minibatch" if has_minibatch else "full"
    searched = [t for t in raw if t.value is not None and (trial_kind(t) or "minibatch") == search_kind]

    best_so_far: list[dict[str, Any]] = []
    best = -math.inf
    for t in sorted((t for t in trials if t["kind"] in full_kinds), key=lambda t: t["trial"]):
        if t["score"] > best:  # strict, as the coordinator: a tie keeps the earlier program
            best = t["score"]
            best_so_far.append({"trial": t["trial"], "t_s": t["t_s"], "score": t["score"]})

    phases: dict[str, Any] = {}
    for name in PHASES:
        stats = (result.get("phases") or {}).get(name)
        if stats is None:
            checkpoint = store.load_checkpoint(job_id, name)
            stats = None if checkpoint is None else checkpoint.get("stats")
        if stats is not None:
            phases[name] = _phase_numbers(stats)
    costs = [p["cost_usd"] for p in phases.values()]
    total = {
        "lm_calls": sum(p["lm_calls"] for p in phases.values()),
        "tokens": sum(p["tokens"] for p in phases.values()),
        "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 6),
        "wall_s": round(float(result["wall_s"]), 3)
        if "wall_s" in result
        else round(sum(p["wall_s"] for p in phases.values()), 3),
    }
    baseline = next((t["score"] for t in trials if t["kind"] == "baseline"), result.get("baseline_score"))
    best_score = result.get("best_score", best_so_far[-1]["score"] if best_so_far else None)
    full_study = _study(full_study_name(f"dmipro:{job_id}"), url)
    return {
        "job_id": job_id,
        "name": record.name,
        "state": record.state.value,
        "phase": record.phase,
        "program": record.spec.get("program"),
        "lm": (record.spec.get("lm") or {}).get("model"),
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.created_at)),
        "baseline_score": baseline,
        "best_score": best_score,
        "improvement": None if baseline is None or best_score is None else round(best_score - baseline, 4),
        "stop_reason": result.get("stop_reason"),
        "error": record.error,
        "search_kind": search_kind,
        "trials": trials,
        "best_so_far": best_so_far,
        "importance": _importance(searched, predictors),
        "choices": _choices(searched, predictors),
        "phases": phases,
        "total": total,
        "studies": {
            "search": None if study is None else f"dmipro:{job_id}",
            "full": None if full_study is None else full_study_name(f"dmipro:{job_id}"),
        },
    }


# -- the figure ---------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("dmipro report draws with matplotlib: pip install 'dmipro[bench]'") from exc
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


def _fmt_cost(c: float | None) -> str:
    if c is None:
        return "unknown"
    return f"${c:.4f}" if c < 1 else f"${c:,.2f}"


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
        ("cost", "cost_usd", _fmt_cost(total["cost_usd"])),
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
        f" · {_fmt_cost(total['cost_usd'])} · {total['wall_s']:.1f} s"
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


# -- HTML -----------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px} h3{font-size:14px;margin:14px 0 4px}
.muted{color:#666}
img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px;margin:6px 0 14px}
th,td{border-bottom:1px solid #e6e6e6;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f6f6} td.n{text-align:right;font-variant-numeric:tabular-nums}
.jobs{display:flex;gap:32px;flex-wrap:wrap} .job{flex:1;min-width:480px}
.kind-full,.kind-baseline{font-weight:600}
"""


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = "" if v is None else str(v)
            cls = ' class="n"' if i in numeric else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _job_html(data: dict[str, Any]) -> str:
    summary = _table(
        ["", ""],
        [
            ["state", data["state"] + (f" ({data['stop_reason']})" if data["stop_reason"] else "")],
            ["program", data["program"]],
            ["LM", data["lm"]],
            ["created", data["created_at"]],
            ["baseline score", data["baseline_score"]],
            ["best score", data["best_score"]],
            ["improvement", data["improvement"]],
            ["optuna studies", ", ".join(s for s in data["studies"].values() if s)],
            *([["error", data["error"]]] if data["error"] else []),
        ],
    )
    phase_rows = [
        [name, p["task_lm_calls"], p["prompt_lm_calls"], p["tokens"], _fmt_cost(p["cost_usd"]), p["wall_s"]]
        for name, p in data["phases"].items()
    ]
    t = data["total"]
    phase_rows.append(["total", "", "", t["tokens"], _fmt_cost(t["cost_usd"]), t["wall_s"]])
    phases = _table(
        ["phase", "task-LM calls", "prompt-LM calls", "tokens", "cost", "wall s"], phase_rows, {1, 2, 3, 4, 5}
    )
    imp = data["importance"]
    if imp["params"]:
        importance = (
            _table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in imp["params"].items()], {1})
            + f'<p class="muted">fANOVA, seed 0, on {imp["trials"]} {data["search_kind"]} trials.</p>'
        )
    else:
        importance = f'<p class="muted">{html.escape(imp["note"] or "")}</p>'
    choices = "".join(
        f"<h3>{html.escape(label)}</h3>"
        + _table(
            ["choice", "mean score", "trials"],
            [[f"#{c['choice']}", c["mean_score"], c["trials"]] for c in rows],
            {1, 2},
        )
        for label, rows in data["choices"].items()
    )
    extra = sorted({k for t in data["trials"] for k in t if "." in k})
    trials = _table(
        ["trial", "kind", "score", "t (s)", *extra],
        [
            [t["trial"], t["kind"], t["score"], t["t_s"], *[t.get(k, "") for k in extra]]
            for t in data["trials"]
        ],
        {0, 2, 3},
    )
    return (
        f'<div class="job"><h2>{html.escape(data["job_id"])}</h2>{summary}'
        f"<h2>Per phase</h2>{phases}<h2>Which choices mattered</h2>{importance}{choices}"
        f"<h2>Trials</h2>{trials}</div>"
    )


def render_html(reports: list[dict[str, Any]], png: bytes) -> str:
    """One self-contained HTML file: the figure embedded as base64, the tables inline, no network."""
    title = "dmipro report: " + " vs ".join(d["job_id"] for d in reports)
    image = base64.b64encode(png).decode("ascii")
    jobs = "".join(_job_html(d) for d in reports)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="muted">generated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}</p>'
        f'<img alt="run report figure" src="data:image/png;base64,{image}">'
        f'<div class="jobs">{jobs}</div></body></html>\n'
    )


def write_report(reports: list[dict[str, Any]], out: Path) -> Path:
    """Write the report as ``.png`` or ``.html`` (by the suffix of ``out``)."""
    suffix = out.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise ConfigError(f"report --out must end in .png or .html, not {out.name!r}")
    png = render_png(reports)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # Written aside and renamed: a failed render never leaves half a report behind.
    if suffix == ".png":
        tmp.write_bytes(png)
    else:
        tmp.write_text(render_html(reports, png), encoding="utf-8")
    tmp.replace(out)
    return out


def report(job_ids: list[str], *, out: Path | None = None, figure_file: bool = True) -> dict[str, Any]:
    """Collect one or two jobs and write the figure; the JSON document ``dmipro report --json`` prints.

    Without ``out`` the figure goes to ``report-<job>.png`` (``report-<a>-vs-<b>.png``) in the
    current directory, unless ``figure_file`` is false (``--json`` alone: numbers only).
    """
    if not 1 <= len(job_ids) <= 2:
        raise ConfigError(f"dmipro report takes one job id, or two to compare; got {len(job_ids)}")
    # Libraries print (optuna, DSPy): nothing of theirs may reach stdout, which holds the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        reports = [collect(job) for job in job_ids]
        written = None
        if out is not None or figure_file:
            target = out or Path("report-" + "-vs-".join(job_ids) + ".png")
            written = str(write_report(reports, target))
    return {"out": written, "jobs": reports}
