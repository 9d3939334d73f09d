"""Evaluation throughput on the thread executor as concurrency grows.

Evaluates the unoptimized math_qa program on its dev set with the simulated LM answering
after a fixed latency (``lm.sim.latency_ms``), at each concurrency, and reports wall time,
examples per second, LM calls, the speedup over concurrency 1, and two bounds:

* ``ideal_speedup`` = min(concurrency, n): every slot busy all the time;
* ``lower_bound_wall_s`` = calls x latency / concurrency, the wall time that speedup implies;
* ``schedule_speedup`` / ``schedule_wall_s``: the best the evaluator's chunk plan allows
  (examples are shipped in chunks of at most ``chunk_size``, so some slots may finish a round
  early or sit idle).

At concurrency 1 the full set takes n x latency; when that exceeds ``--budget-s`` only
``--n-at-1`` examples run there and the wall time is scaled to n (the JSON says so).

    python bench/evaluate_throughput.py --latency-ms 100 --concurrency 1,4,16,64

Writes ``bench/results/evaluate_throughput.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

JOB_FILE = REPO / "examples" / "math_qa" / "job.yaml"
RESULTS = Path(__file__).resolve().parent / "results"


def _job(n: int, latency_ms: float) -> Any:
    """The math_qa job with its first ``n`` dev examples inline and a slow simulated LM."""
    from dmipro.jobs import load_job

    spec = yaml.safe_load(JOB_FILE.read_text())
    dev = [json.loads(line) for line in (JOB_FILE.parent / spec["valset"]).read_text().splitlines()]
    if n > len(dev):
        raise SystemExit(f"--n {n} is larger than the dev set ({len(dev)} examples)")
    spec["valset"] = dev[:n]
    spec["lm"] = {**spec["lm"], "sim": {"latency_ms": latency_ms}}
    spec["executor"] = {**spec.get("executor", {}), "backend": "thread"}
    return load_job(spec, base_dir=JOB_FILE.parent)


def _schedule(n: int, concurrency: int, chunk_size: int) -> int:
    """Examples the busiest slot scores one after another under the evaluator's chunk plan."""
    chunk = max(1, min(chunk_size, math.ceil(n / concurrency)))
    sizes = [min(chunk, n - lo) for lo in range(0, n, chunk)]
    slots = [0] * concurrency
    for size in sizes:  # a free slot takes the next chunk
        slots[slots.index(min(slots))] += size
    return max(slots)


def _measure(n: int, concurrency: int, latency_ms: float) -> dict[str, Any]:
    import dmipro

    job = _job(n, latency_ms)
    start = time.perf_counter()
    result = dmipro.evaluate(job, executor="thread", concurrency=concurrency)
    wall = time.perf_counter() - start
    return {
        "n_run": result.n,
        "wall_s_run": wall,
        "calls_run": result.usage.calls,
        "score": result.score,
        "errors": result.errors,
        "chunk_size": job.spec.executor.chunk_size,
    }


def run(
    latency_ms: float, concurrencies: list[int], n: int, n_at_1: int | None, budget_s: float
) -> dict[str, Any]:
    import dspy

    _measure(5, 4, 0.0)  # warm-up: imports and first-call set-up stay out of the timings
    rows = []
    for c in concurrencies:
        subset = c == 1 and (n_at_1 is not None or n * latency_ms / 1000 > budget_s)
        n_run = (n_at_1 or 60) if subset else n
        m = _measure(min(n_run, n), c, latency_ms)
        scale = n / m["n_run"]
        wall = m["wall_s_run"] * scale
        calls = round(m["calls_run"] * scale)
        per_example = m["calls_run"] / m["n_run"]
        busiest = _schedule(n, c, m["chunk_size"])
        row = {
            "concurrency": c,
            "n": n,
            "n_run": m["n_run"],
            "scaled_from_subset": subset,
            "wall_s": round(wall, 3),
            "examples_per_s": round(n / wall, 2),
            "lm_calls": calls,
            "score": m["score"],
            "errors": m["errors"],
            "ideal_speedup": min(c, n),
            "lower_bound_wall_s": round(calls * latency_ms / 1000 / c, 3),
            "schedule_speedup": round(n / busiest, 2),
            "schedule_wall_s": round(busiest * per_example * latency_ms / 1000, 3),
        }
        rows.append(row)
        print(
            f"concurrency {c:>3}: {row['wall_s']:>7.2f} s  {row['examples_per_s']:>7.1f} ex/s  "
            f"{calls} calls  (lower bound {row['lower_bound_wall_s']:.2f} s)"
            + (f"  [scaled from {m['n_run']} examples]" if subset else ""),
            flush=True,
        )
    base = next((r for r in rows if r["concurrency"] == 1), None)
    for r in rows:
        if base is not None:
            r["speedup"] = round(base["wall_s"] / r["wall_s"], 2)
            r["efficiency"] = round(r["speedup"] / r["ideal_speedup"], 3)
    return {
        "benchmark": "evaluate_throughput",
        "what": "dmipro.evaluate of the unoptimized math_qa program (dspy.ChainOfThought) on the math_qa dev "
        "set, thread executor, simulated LM with fixed latency",
        "config": {
            "latency_ms": latency_ms,
            "concurrency": concurrencies,
            "n": n,
            "n_at_1": n_at_1,
            "budget_s": budget_s,
            "executor": "thread",
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "dspy": dspy.__version__,
        },
        "results": rows,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    from bench._plot import pyplot, save

    plt = pyplot()

    rows = report["results"]
    cs = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(cs, [r["wall_s"] for r in rows], "o-", label="measured")
    left.plot(cs, [r["schedule_wall_s"] for r in rows], "s:", label="chunk-plan bound")
    left.plot(cs, [r["lower_bound_wall_s"] for r in rows], "--", label="calls × latency / concurrency")
    left.set(
        xscale="log",
        yscale="log",
        xlabel="concurrency (threads)",
        ylabel="wall time (s)",
        title=f"Evaluate {rows[0]['n']} examples, {report['config']['latency_ms']:g} ms per LM call",
    )
    if "speedup" in rows[0]:
        right.plot(cs, [r["speedup"] for r in rows], "o-", label="measured")
        right.plot(cs, [r["schedule_speedup"] for r in rows], "s:", label="chunk-plan bound")
        right.plot(cs, [r["ideal_speedup"] for r in rows], "--", label="ideal min(concurrency, n)")
        right.set(
            xscale="log",
            yscale="log",
            xlabel="concurrency (threads)",
            ylabel="speedup over 1 thread",
            title="Speedup",
        )
        right.legend()
    for ax in (left, right):
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(True, which="both", alpha=0.3)
    left.legend()
    save(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency-ms", type=float, default=100.0, help="simulated latency per LM call")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated thread counts")
    parser.add_argument("--n", type=int, default=300, help="dev examples to evaluate (at most 300)")
    parser.add_argument(
        "--n-at-1",
        type=int,
        default=None,
        help="run only this many examples at concurrency 1 and scale (default: the full set "
        "when it fits in --budget-s, else 60)",
    )
    parser.add_argument("--budget-s", type=float, default=35.0, help="time allowed for the concurrency-1 run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and PNG")
    args = parser.parse_args(argv)
    concurrencies = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    report = run(args.latency_ms, concurrencies, args.n, args.n_at_1, args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluate_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "evaluate_throughput.png")
    print(f"wrote {args.out / 'evaluate_throughput.json'} and .png")


if __name__ == "__main__":
    main()
