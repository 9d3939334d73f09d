"""A/B statistics and recording, measured: power, false positives under peeking, record throughput.

* **Power**: experiments with a true lift (default 10 points on a 50% base) run to the
  sequential plan's size; the share in which the treatment is declared the winner.
* **Peeking**: A/A experiments looked at every ``--look-every`` units up to ``--units``;
  the share that declare a winner with the mixture SPRT (dmipro's default) and with a
  fixed-horizon z-test checked at the same looks (what a dashboard invites).
* **Recording**: ``Experiment.record`` calls per second in one process (buffered, a
  background thread writes batches) and the time until ``flush`` has stored them, on SQLite.

    python bench/ab_stats.py --experiments 1000

Writes ``bench/results/ab_stats.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).resolve().parent / "results"


def power(experiments: int, base: float, lift: float, seed: int) -> dict[str, Any]:
    from dmipro.ab import stats

    plan = stats.plan(base, lift)
    horizon = plan["sequential"]["total"]
    rng = np.random.default_rng(seed)
    treated = rng.random((experiments, horizon)) < 0.5
    values = (rng.random((experiments, horizon)) < np.where(treated, base + lift, base)).astype(float)
    path = stats.sequential_path(values, treated, alpha=0.05, mde=lift)
    won = (path.p_value <= 0.05) & (path.ci_low > 0)
    first = np.where(won.any(axis=1), won.argmax(axis=1) + 1, horizon + 1)
    curve = [float((first <= n).mean()) for n in range(100, horizon + 1, 100)]
    return {"base": base, "lift": lift, "plan": plan, "power": float(won[:, -1].mean()),
            "median_units_to_decision": float(np.median(first[first <= horizon])) if (first <= horizon).any()
            else None, "power_by_units": {"units": list(range(100, horizon + 1, 100)), "power": curve}}


def peeking(experiments: int, units: int, look_every: int, seed: int) -> dict[str, Any]:
    from dmipro.ab import stats

    rng = np.random.default_rng(seed)
    treated = rng.random((experiments, units)) < 0.5
    values = (rng.random((experiments, units)) < 0.5).astype(float)
    path = stats.sequential_path(values, treated, alpha=0.05, mde=0.05)
    looks = np.arange(look_every - 1, units, look_every)
    c, t = path.control, path.treatment
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (t.mean - c.mean) / np.sqrt(c.mean * (1 - c.mean) / c.n + t.mean * (1 - t.mean) / t.n)
    msprt = np.maximum.accumulate(path.p_value[:, looks] <= 0.05, axis=1).mean(axis=0)
    naive = np.maximum.accumulate(np.abs(z[:, looks]) > 1.959964, axis=1).mean(axis=0)
    return {"experiments": experiments, "units": units, "look_every": look_every,
            "looks": (looks + 1).tolist(), "msprt_fpr": msprt.tolist(), "naive_fpr": naive.tolist()}


def recording(n: int) -> dict[str, Any]:
    home = tempfile.mkdtemp(prefix="dmipro-ab-bench-")
    os.environ["DMIPRO_HOME"] = home
    os.environ.pop("DMIPRO_DATABASE_URL", None)
    import dmipro
    import dmipro.registry as registry
    from dmipro.config import reload_settings
    from dmipro.storage import ProgramRecord
    from examples.math_qa.program import build

    reload_settings()
    for text in (None, "Think step by step."):
        program = build()
        if text:
            program.predict.signature = program.predict.signature.with_instructions(text)
        registry.register("math_qa", ProgramRecord.from_program(program, program_ref=build))
    exp = dmipro.ab.create("bench", control="math_qa@1", treatment="math_qa@2")
    start = time.perf_counter()
    for i in range(n):
        exp.assign(i)
    assign_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(n):
        exp.record(i, i % 2, latency_ms=10.0)
    record_s = time.perf_counter() - start
    exp.flush()
    stored_s = time.perf_counter() - start
    return {"outcomes": n, "assign_per_s": n / assign_s, "record_per_s": n / record_s,
            "stored_per_s": n / stored_s, "database": "sqlite"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--look-every", type=int, default=100)
    parser.add_argument("--record", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "power": power(args.experiments, 0.5, 0.10, args.seed),
        "peeking": peeking(args.experiments, args.units, args.look_every, args.seed + 1),
        "recording": recording(args.record),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ab_stats.json").write_text(json.dumps(result, indent=2) + "\n")

    from bench._plot import pyplot

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    pk = result["peeking"]
    right.plot(pk["looks"], pk["naive_fpr"], marker=".", label="z-test, checked at every look")
    right.plot(pk["looks"], pk["msprt_fpr"], marker=".", label="mixture SPRT (dmipro)")
    right.axhline(0.05, color="grey", ls=":", label="alpha = 0.05")
    right.set_xlabel(f"units so far (a look every {pk['look_every']})")
    right.set_ylabel("A/A experiments that declared a winner")
    right.set_title(f"False positives under peeking ({pk['experiments']} A/A experiments)")
    right.legend(fontsize=8)
    pw = result["power"]
    left.plot(pw["power_by_units"]["units"], pw["power_by_units"]["power"], marker=".")
    left.axhline(0.8, color="grey", ls=":", label="planned power 0.8")
    left.axvline(pw["plan"]["sequential"]["total"], color="tab:red", ls="--", label="sequential plan")
    left.axvline(pw["plan"]["fixed"]["total"], color="grey", ls="-.", label="fixed-horizon plan")
    left.set_xlabel("units")
    left.set_ylabel("experiments won by the treatment")
    left.set_title(f"Power: +{pw['lift']:.0%} on a {pw['base']:.0%} base")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "ab_stats.png")
    summary = {"power": pw["power"], "msprt_fpr": pk["msprt_fpr"][-1], "naive_fpr": pk["naive_fpr"][-1]}
    print(json.dumps({**summary, **result["recording"]}, indent=2))


if __name__ == "__main__":
    main()
