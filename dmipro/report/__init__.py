"""A run report: one figure of a job, from the job database and its Optuna study.

:func:`collect` gathers the numbers (works for a running, failed or finished job: the
trials come from the study, per-phase usage from the job's result or, before it ends,
from its phase checkpoints). :func:`render_png` draws them — scores per trial with the
baseline, dmipro's best so far over time, which instruction and demo choices mattered,
and LM calls, tokens, cost and wall time per phase — for one job, or two side by side.
:func:`render_html` wraps the figure and the tables in one self-contained file.

matplotlib comes with the ``bench`` extra and the importance evaluator (fANOVA) needs
scikit-learn, which comes with it too; both are imported only when a figure is drawn.

The numbers live in ``_collect``, the figure in ``_figure`` and the page in ``_html``;
this module writes the file and is what ``dmipro report`` calls.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from dmipro.errors import ConfigError
from dmipro.report._collect import MIN_IMPORTANCE_TRIALS, collect
from dmipro.report._figure import figure, render_png
from dmipro.report._html import render_html

__all__ = [
    "MIN_IMPORTANCE_TRIALS",
    "collect",
    "figure",
    "render_html",
    "render_png",
    "report",
    "write_report",
]


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
