"""The report as one self-contained HTML page: the figure inline, the tables beside it."""

from __future__ import annotations

import base64
import html
import time
from typing import Any

from dmipro.report._collect import fmt_cost

__all__ = ["render_html"]

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
        [name, p["task_lm_calls"], p["prompt_lm_calls"], p["tokens"], fmt_cost(p["cost_usd"]), p["wall_s"]]
        for name, p in data["phases"].items()
    ]
    t = data["total"]
    phase_rows.append(["total", "", "", t["tokens"], fmt_cost(t["cost_usd"]), t["wall_s"]])
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
