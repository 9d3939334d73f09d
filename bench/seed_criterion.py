"""Light, medium and heavy runs at real LM latency: dmipro (threads and 4 Celery workers) vs DSPy.

The math_qa program (one ChainOfThought predictor) on 300 train and ``--val-size`` (300)
validation examples, the simulated LM at a fixed ``--latency-ms`` (1000) per call
multiplied by a per-mode scale (``--scales``, default light 1.0, medium 0.25, heavy 0.1:
the unscaled medium and heavy runs take longer than the machine is free; the scale is in
the results and the plot). For each mode:

* dmipro on the thread executor with ``--threads`` (16) slots, and ``dspy.MIPROv2`` with
  ``num_threads`` = 16;
* dmipro on ``--workers`` (4) Celery work workers of 16 slots (PostgreSQL + Redis, real
  worker processes), and ``dspy.MIPROv2`` with ``num_threads`` = 64.

Reports wall times, the ratio to DSPy's, LM calls and validation scores, and whether
light finishes in well under 5 minutes at 1 s per call (the seed criterion). Writes
``bench/results/seed_criterion.json`` and ``.png``::

    python bench/seed_criterion.py
    python bench/seed_criterion.py --modes light --scales light=1.0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"


def _rows(split: str) -> list[dict[str, Any]]:
    path = REPO / "examples" / "math_qa" / "data" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spec(mode: str, latency_ms: float, val_size: int, backend: str, concurrency: int) -> dict[str, Any]:
    sim = {"latency_ms": latency_ms}
    return {
        "name": f"seed-{mode}-{backend}",
        "program": "examples.math_qa.program:build",
        "metric": "examples.math_qa.program:exact_match",
        "trainset": _rows("train"),
        "valset": (_rows("dev") + _rows("test"))[:val_size],
        "input_keys": ["question"],
        "lm": {"model": "sim/math", "temperature": 0.0, "sim": sim},
        "prompt_lm": {"model": "sim/math", "temperature": 1.0, "sim": dict(sim)},
        "optimizer": {"auto": mode, "seed": 0},
        "executor": {"backend": backend, "concurrency": concurrency},
    }


def run_dspy(mode: str, latency_ms: float, val_size: int, threads: int) -> dict[str, Any]:
    import dspy

    from bench.compare_dspy import CountingEngine, counting_lm
    from examples.math_qa.program import build, exact_match

    train = [dspy.Example(**r).with_inputs("question") for r in _rows("train")]
    val = [dspy.Example(**r).with_inputs("question") for r in (_rows("dev") + _rows("test"))[:val_size]]
    task = CountingEngine("math", latency_ms=latency_ms)
    prompt = CountingEngine("math", latency_ms=latency_ms)
    optimizer = dspy.MIPROv2(metric=exact_match, prompt_model=counting_lm(prompt, 1.0),
                             task_model=counting_lm(task, 0.0), auto=mode, num_threads=threads, seed=0,
                             verbose=False)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        program = optimizer.compile(build(), trainset=train, valset=val)
    return {"wall_s": round(time.perf_counter() - t0, 2), "lm_calls": task.calls + prompt.calls,
            "val_score": round(float(getattr(program, "score", 0.0)), 2)}


def run_thread(mode: str, latency_ms: float, val_size: int, threads: int) -> dict[str, Any]:
    import dmipro

    t0 = time.perf_counter()
    result = dmipro.optimize(spec(mode, latency_ms, val_size, "thread", threads))
    return {"wall_s": round(time.perf_counter() - t0, 2), "lm_calls": result.usage.calls,
            "val_score": round(result.best_score, 2)}


def run_celery(mode: str, latency_ms: float, val_size: int, slots: int) -> dict[str, Any]:
    from dmipro.jobs import load_job
    from dmipro.jobs.submit import submit

    t0 = time.perf_counter()
    report = submit(load_job(spec(mode, latency_ms, val_size, "celery", slots)), executor="celery").wait(
        timeout=3 * 3600)
    if report["state"] != "succeeded":
        raise SystemExit(f"the {mode} job {report['state']}: {report['error']}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "lm_calls": report["lm_calls"],
            "val_score": round(report["best_score"], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="light,medium,heavy")
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument("--scales", default="light=1.0,medium=0.25,heavy=0.1")
    parser.add_argument("--val-size", type=int, default=300)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "seed_criterion.json")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    scales = {k: float(v) for k, v in (part.split("=") for part in args.scales.split(",") if part)}

    from bench.compare_dspy import silence
    from bench.scaling import Fleet

    silence()
    load_before = list(os.getloadavg())
    fleet = Fleet(args.slots, database_url=None)
    rows = []
    try:
        fleet.scale_to(args.workers)
        slots = args.workers * args.slots
        for mode in modes:
            latency = args.latency_ms * scales.get(mode, 1.0)
            row: dict[str, Any] = {"mode": mode, "latency_ms": latency, "scale": scales.get(mode, 1.0)}
            row["dmipro_thread"] = run_thread(mode, latency, args.val_size, args.threads)
            row["dspy_thread"] = run_dspy(mode, latency, args.val_size, args.threads)
            row["dmipro_celery"] = run_celery(mode, latency, args.val_size, slots)
            row["dspy_celery_slots"] = run_dspy(mode, latency, args.val_size, slots)
            for kind, theirs in (("thread", "dspy_thread"), ("celery", "dspy_celery_slots")):
                row[f"ratio_{kind}"] = round(row[f"dmipro_{kind}"]["wall_s"] / row[theirs]["wall_s"], 3)
            row["load_average"] = list(os.getloadavg())
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        fleet.close()
    light = next((r for r in rows if r["mode"] == "light" and r["scale"] == 1.0), None)
    out = {
        "benchmark": "seed_criterion",
        "program": "examples.math_qa.program:build (one ChainOfThought predictor)",
        "trainset": "train.jsonl (300)",
        "valset": f"dev.jsonl then test.jsonl, first {args.val_size}",
        "latency_ms_real": args.latency_ms,
        "scales": scales,
        "threads": args.threads,
        "workers": args.workers,
        "slots_per_worker": args.slots,
        "database": fleet.database,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": rows,
        "criterion": None if light is None else {
            "name": "auto=light at 1 s per call finishes in well under 5 minutes",
            "thread_wall_s": light["dmipro_thread"]["wall_s"],
            "celery_wall_s": light["dmipro_celery"]["wall_s"],
            "met": max(light["dmipro_thread"]["wall_s"], light["dmipro_celery"]["wall_s"]) < 150,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    _plot(out, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def _plot(data: dict[str, Any], path: Path) -> None:
    from bench._plot import pyplot, save

    plt = pyplot()

    rows = data["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * max(1, len(rows)), 4), squeeze=False)
    keys = [("dspy_thread", f"DSPy, {data['threads']} threads"),
            ("dmipro_thread", f"dmipro, {data['threads']} threads"),
            ("dspy_celery_slots", f"DSPy, {data['workers'] * data['slots_per_worker']} threads"),
            ("dmipro_celery", f"dmipro, {data['workers']} Celery workers")]
    for ax, row in zip(axes[0], rows, strict=False):
        walls = [row[k]["wall_s"] for k, _ in keys]
        ax.bar(range(len(keys)), walls, color=["#c44e52", "#4c72b0", "#dd8452", "#55a868"])
        ax.set_xticks(range(len(keys)), [label for _, label in keys], rotation=20, fontsize=7)
        for x, w in enumerate(walls):
            ax.text(x, w, f"{w:.0f} s", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"auto={row['mode']}, {row['latency_ms']:g} ms/call (x{row['scale']:g} of 1 s)",
                     fontsize=9)
        ax.set_ylabel("wall time (s)")
    save(fig, path, dpi=110)


if __name__ == "__main__":
    main()
