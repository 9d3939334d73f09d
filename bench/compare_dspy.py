"""dmipro's MIPROv2 side by side with ``dspy.MIPROv2`` on the simulated LM.

Both optimizers run ``auto="light"`` on the math_qa program (one ``ChainOfThought``
predictor) with the same data (the first 100 train and the first 100 dev examples), the
same simulated LM with a fixed latency, and the same concurrency (dmipro's thread
executor, DSPy's ``num_threads``), for several seeds. Each run reports:

* the score of the final program on the 300 test examples, which neither optimizer sees;
* task-LM and prompt-LM calls, in total and per phase (bootstrap, propose, search);
* wall time per phase and in total;
* for dmipro, a lower bound on the wall time that is honest about CPU as well as LM
  latency: ``max((task + prompt calls) x latency / concurrency, sum of phase depths x
  latency, CPU-seconds / cores)``, where a phase's depth is its critical path in LM calls
  (``PhaseStats.depth``) and CPU-seconds are the process's own (every thread: DSPy's
  prompt formatting and parsing, the simulator, Optuna, the job store) over the run; and
  the tighter per-phase bound (the latency formula per phase, summed, since phases run one
  after another);
* where the rest of dmipro's wall time goes: per phase, the wall time above that phase's
  bound, and the time outside the three phases (loading, planning, saving).

DSPy's calls are counted by the simulator engine behind its two ``dspy.LM`` objects (one
for the task model, one for the prompt model); its phases are timed by wrapping the three
``MIPROv2`` methods that implement them. DSPy's response cache is off, so no seed gets
free answers from an earlier one.

Writes ``compare_dspy.json`` and ``compare_dspy.png`` to ``--out-dir`` (default
``bench/results``) and prints a summary table::

    python bench/compare_dspy.py                 # seeds 0-4, concurrency 16 and 64
    python bench/compare_dspy.py --quick         # one seed, for a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import tqdm
from dspy.teleprompt.mipro_optimizer_v2 import MIPROv2 as DspyMIPROv2

import dmipro
from dmipro.config import reload_settings
from dmipro.lm._sim import AsyncSimEngine, SimEngine, sim_lm
from examples.math_qa.program import build, exact_match

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "math_qa" / "data"
TRAIN_SIZE, VAL_SIZE = 100, 100
PHASES = ("bootstrap", "propose", "search")
DSPY_PHASE_METHODS = {
    "bootstrap": "_bootstrap_fewshot_examples",
    "propose": "_propose_instructions",
    "search": "_optimize_prompt_parameters",
}
WALL_TARGETS = {16: 0.5, 64: 0.35}
"""Target dmipro/DSPy wall-time ratio per concurrency; other concurrencies use the stricter one."""
TASK_CALLS_TARGET = 0.8
BOUND_TARGET = 1.25
BOUND_FORMULA = (
    "lower_bound_s = max((task_lm_calls + prompt_lm_calls) * latency_s / concurrency, "
    "sum(phase.depth) * latency_s, cpu_s / cores); phase.depth = the phase's critical path in LM "
    "calls; cpu_s = the process's user+system CPU seconds over the run (all threads)"
)
PHASE_BOUND_FORMULA = (
    "phase_lower_bound_s = sum over phases of max((phase task + prompt calls) * latency_s / concurrency, "
    "phase.depth * latency_s); tighter, since the phases run one after another"
)


# -- data -----------------------------------------------------------------------------------


def records(split: str, n: int | None = None) -> list[dict[str, Any]]:
    lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n] if line.strip()]


def examples(rows: list[dict[str, Any]]) -> list[dspy.Example]:
    return [dspy.Example(**row).with_inputs("question") for row in rows]


# -- quiet DSPy ---------------------------------------------------------------------------------


def silence() -> None:
    """No progress bars, no info logs: the bench prints its own lines."""
    original = tqdm.tqdm.__init__

    @functools.wraps(original)
    def quiet_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.tqdm.__init__ = quiet_init  # type: ignore[method-assign]
    dspy.disable_logging()
    dspy.disable_litellm_logging()
    for name in ("dspy", "dmipro", "optuna", "LiteLLM", "litellm", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


# -- DSPy's MIPROv2, counted and timed -------------------------------------------------------------


class CountingEngine(SimEngine):
    """The simulator, counting the completions it serves (``dspy.LM.copy()`` shares the engine)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self._count_lock = threading.Lock()

    def complete(self, request: Any) -> Any:
        with self._count_lock:
            self.calls += 1
        return super().complete(request)


def counting_lm(engine: CountingEngine, temperature: float) -> dspy.LM:
    return dspy.LM(
        "sim/math",
        engine=engine,
        async_engine=AsyncSimEngine(engine),
        cache=False,
        temperature=temperature,
    )


class PhaseRecorder:
    """Wall time and LM calls of each DSPy MIPROv2 phase, while :meth:`patched` is active."""

    def __init__(self, task: CountingEngine, prompt: CountingEngine) -> None:
        self.task, self.prompt = task, prompt
        self.phases: dict[str, dict[str, float]] = {}

    def _wrap(self, phase: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            task0, prompt0, t0 = self.task.calls, self.prompt.calls, time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.phases[phase] = {
                    "wall_s": time.perf_counter() - t0,
                    "task_lm_calls": self.task.calls - task0,
                    "prompt_lm_calls": self.prompt.calls - prompt0,
                }

        return timed

    @contextlib.contextmanager
    def patched(self) -> Iterator[PhaseRecorder]:
        originals = {name: getattr(DspyMIPROv2, name) for name in DSPY_PHASE_METHODS.values()}
        try:
            for phase, name in DSPY_PHASE_METHODS.items():
                setattr(DspyMIPROv2, name, self._wrap(phase, originals[name]))
            yield self
        finally:
            for name, method in originals.items():
                setattr(DspyMIPROv2, name, method)


def run_dspy(seed: int, concurrency: int, latency_ms: float, data: dict[str, Any]) -> dict[str, Any]:
    task_engine = CountingEngine("math", latency_ms=latency_ms)
    prompt_engine = CountingEngine("math", latency_ms=latency_ms)
    task_lm = counting_lm(task_engine, 0.0)
    prompt_lm = counting_lm(prompt_engine, 1.0)
    optimizer = dspy.MIPROv2(
        metric=exact_match,
        prompt_model=prompt_lm,
        task_model=task_lm,
        auto="light",
        num_threads=concurrency,
        seed=seed,
        verbose=False,
    )
    recorder = PhaseRecorder(task_engine, prompt_engine)
    # DSPy prints bootstrap progress with print(); keep the bench's own output readable.
    with recorder.patched(), contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        program = optimizer.compile(build(), trainset=data["train"], valset=data["val"])
        wall = time.perf_counter() - t0
    phases = {p: {k: _round(v) for k, v in recorder.phases.get(p, {}).items()} for p in PHASES}
    row = {
        "optimizer": "dspy",
        "seed": seed,
        "concurrency": concurrency,
        "val_score": _round(getattr(program, "score", float("nan"))),
        "baseline_val_score": _round(_dspy_baseline(program)),
        "task_lm_calls": task_engine.calls,
        "prompt_lm_calls": prompt_engine.calls,
        "phases": phases,
        "wall_s": _round(wall),
        "throughput_bound_s": _round(
            (task_engine.calls + prompt_engine.calls) * latency_ms / 1000.0 / concurrency
        ),
    }
    return {"row": row, "program": program}


def _dspy_baseline(program: Any) -> float:
    logs = getattr(program, "trial_logs", None) or {}
    first = logs.get(1, {})
    return float(first.get("full_eval_score", float("nan")))


# -- dmipro ---------------------------------------------------------------------------------


def dmipro_spec(seed: int, concurrency: int, latency_ms: float) -> dict[str, Any]:
    sim = {"latency_ms": latency_ms}
    return {
        "name": f"compare-dspy-s{seed}-c{concurrency}",
        "program": "examples.math_qa.program:build",
        "metric": "examples.math_qa.program:exact_match",
        "trainset": records("train", TRAIN_SIZE),
        "valset": records("dev", VAL_SIZE),
        "input_keys": ["question"],
        "lm": {"model": "sim/math", "temperature": 0.0, "sim": sim},
        "prompt_lm": {"model": "sim/math", "temperature": 1.0, "sim": dict(sim)},
        "optimizer": {"auto": "light", "seed": seed},
        "executor": {"backend": "thread", "concurrency": concurrency},
    }


def run_dmipro(seed: int, concurrency: int, latency_ms: float) -> dict[str, Any]:
    latency = latency_ms / 1000.0
    spec = dmipro_spec(seed, concurrency, latency_ms)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = dmipro.optimize(spec)
    outer = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    cores = os.cpu_count() or 1
    phases: dict[str, dict[str, Any]] = {}
    depth = phase_bound = 0.0
    for name in PHASES:
        stats = result.phases.get(name)
        if stats is None:
            continue
        calls = stats.task_lm.calls + stats.prompt_lm.calls
        bound = max(calls * latency / concurrency, stats.depth * latency)
        depth += stats.depth
        phase_bound += bound
        phases[name] = {
            "wall_s": _round(stats.wall_s),
            "task_lm_calls": stats.task_lm.calls,
            "prompt_lm_calls": stats.prompt_lm.calls,
            "depth": stats.depth,
            "lower_bound_s": _round(bound),
            "wall_over_bound": _round(stats.wall_s / bound) if bound else None,
        }
    task_calls = sum(p["task_lm_calls"] for p in phases.values())
    prompt_calls = sum(p["prompt_lm_calls"] for p in phases.values())
    throughput = (task_calls + prompt_calls) * latency / concurrency
    cpu_bound = cpu_s / cores
    bound = max(throughput, depth * latency, cpu_bound)
    # Where the wall time above the bound goes: each phase's excess over its own bound, and
    # what runs outside the phases (job loading, planning, saving the program).
    in_phases = sum(p["wall_s"] or 0.0 for p in phases.values())
    rest = {name: _round(max(0.0, (p["wall_s"] or 0.0) - (p["lower_bound_s"] or 0.0)))
            for name, p in phases.items()}
    rest["outside_phases"] = _round(max(0.0, result.wall_s - in_phases))
    row = {
        "optimizer": "dmipro",
        "seed": seed,
        "concurrency": concurrency,
        "val_score": _round(result.best_score),
        "baseline_val_score": _round(result.baseline_score),
        "trials": result.trials,
        "task_lm_calls": task_calls,
        "prompt_lm_calls": prompt_calls,
        "phases": phases,
        "wall_s": _round(result.wall_s),
        "wall_s_outer": _round(outer),
        "depth": int(depth),
        "throughput_bound_s": _round(throughput),
        "depth_bound_s": _round(depth * latency),
        "cpu_s": _round(cpu_s),
        "cpu_bound_s": _round(cpu_bound),
        "bound_kind": max(
            (("throughput", throughput), ("depth", depth * latency), ("cpu", cpu_bound)), key=lambda kv: kv[1]
        )[0],
        "lower_bound_s": _round(bound),
        "wall_above_phase_bounds_s": rest,
        "wall_over_bound": _round(result.wall_s / bound) if bound else None,
        "phase_lower_bound_s": _round(phase_bound),
        "wall_over_phase_bound": _round(result.wall_s / phase_bound) if phase_bound else None,
    }
    return {"row": row, "program": result.program}


# -- test score -------------------------------------------------------------------------------


def score_on_test(program: Any, test: list[dspy.Example]) -> float:
    """Exact match (0-100) on the test split with a latency-free simulator (same answers)."""
    for predictor in program.predictors():
        predictor.lm = None
    evaluate = dspy.Evaluate(devset=test, metric=exact_match, num_threads=32, display_progress=False)
    with dspy.context(lm=sim_lm("sim/math", temperature=0.0)):
        return float(evaluate(program).score)


# -- summary ------------------------------------------------------------------------------------


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runs": len(rows),
        "test_score": _round(_mean([r["test_score"] for r in rows])),
        "test_score_std": _round(_std([r["test_score"] for r in rows])),
        "val_score": _round(_mean([r["val_score"] for r in rows])),
        "task_lm_calls": _round(_mean([r["task_lm_calls"] for r in rows]), 1),
        "prompt_lm_calls": _round(_mean([r["prompt_lm_calls"] for r in rows]), 1),
        "wall_s": _round(_mean([r["wall_s"] for r in rows])),
        "wall_s_std": _round(_std([r["wall_s"] for r in rows])),
        "phases": {
            p: {
                key: _round(_mean([r["phases"][p][key] for r in rows if p in r["phases"]]))
                for key in ("wall_s", "task_lm_calls", "prompt_lm_calls")
            }
            for p in PHASES
        },
    }
    if rows and "lower_bound_s" in rows[0]:
        out["lower_bound_s"] = _round(_mean([r["lower_bound_s"] for r in rows]))
        out["phase_lower_bound_s"] = _round(_mean([r["phase_lower_bound_s"] for r in rows]))
        out["wall_over_bound"] = _round(_mean([r["wall_over_bound"] for r in rows]))
        out["wall_over_bound_max"] = _round(max(r["wall_over_bound"] for r in rows))
        out["wall_over_phase_bound"] = _round(_mean([r["wall_over_phase_bound"] for r in rows]))
        out["depth"] = _round(_mean([r["depth"] for r in rows]), 1)
        out["cpu_s"] = _round(_mean([r["cpu_s"] for r in rows]))
        out["cpu_bound_s"] = _round(_mean([r["cpu_bound_s"] for r in rows]))
        out["throughput_bound_s"] = _round(_mean([r["throughput_bound_s"] for r in rows]))
        out["depth_bound_s"] = _round(_mean([r["depth_bound_s"] for r in rows]))
        out["wall_above_phase_bounds_s"] = {
            k: _round(_mean([r["wall_above_phase_bounds_s"].get(k) or 0.0 for r in rows]))
            for k in (*PHASES, "outside_phases")
        }
        for p in PHASES:
            out["phases"][p]["depth"] = _round(_mean([r["phases"][p]["depth"] for r in rows]), 1)
            out["phases"][p]["lower_bound_s"] = _round(_mean([r["phases"][p]["lower_bound_s"] for r in rows]))
    return out


def summarize(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    ours = aggregate([r for r in rows if r["optimizer"] == "dmipro" and r["concurrency"] == concurrency])
    theirs = aggregate([r for r in rows if r["optimizer"] == "dspy" and r["concurrency"] == concurrency])
    wall_target = WALL_TARGETS.get(concurrency, min(WALL_TARGETS.values()))
    ratios = {
        "test_score_diff": _round(ours["test_score"] - theirs["test_score"]),
        "task_lm_calls": _round(ours["task_lm_calls"] / theirs["task_lm_calls"]),
        "prompt_lm_calls": _round(ours["prompt_lm_calls"] / theirs["prompt_lm_calls"]),
        "wall_s": _round(ours["wall_s"] / theirs["wall_s"]),
        "phases_wall_s": {
            p: _round(ours["phases"][p]["wall_s"] / theirs["phases"][p]["wall_s"])
            if theirs["phases"][p]["wall_s"]
            else None
            for p in PHASES
        },
    }
    paired = [
        (o["test_score"], t["test_score"])
        for o in rows
        for t in rows
        if o["optimizer"] == "dmipro"
        and t["optimizer"] == "dspy"
        and o["concurrency"] == t["concurrency"] == concurrency
        and o["seed"] == t["seed"]
    ]
    ratios["test_score_seeds"] = {
        "dmipro_higher": sum(1 for o, t in paired if o > t),
        "dspy_higher": sum(1 for o, t in paired if o < t),
        "equal": sum(1 for o, t in paired if o == t),
    }
    targets = [
        {
            "name": "test score >= DSPy's (mean over seeds)",
            "target": f">= {theirs['test_score']}",
            "measured": ours["test_score"],
            "met": ours["test_score"] >= theirs["test_score"],
        },
        {
            "name": "task-LM calls <= 0.8x DSPy's",
            "target": f"<= {TASK_CALLS_TARGET}",
            "measured": ratios["task_lm_calls"],
            "met": ratios["task_lm_calls"] <= TASK_CALLS_TARGET,
        },
        {
            "name": f"wall <= {wall_target}x DSPy's at concurrency {concurrency}",
            "target": f"<= {wall_target}",
            "measured": ratios["wall_s"],
            "met": ratios["wall_s"] <= wall_target,
        },
        {
            "name": "wall within 1.25x of the lower bound (mean of per-run wall/bound)",
            "target": f"<= {BOUND_TARGET}",
            "measured": ours["wall_over_bound"],
            "worst_run": ours["wall_over_bound_max"],
            "met": ours["wall_over_bound"] <= BOUND_TARGET,
        },
    ]
    return {"dmipro": ours, "dspy": theirs, "ratios": ratios, "targets": targets}


# -- output -----------------------------------------------------------------------------------


def print_table(summary: dict[str, Any]) -> None:
    head = (
        f"{'conc':>4} {'optimizer':<9} {'test':>6} {'val':>6} {'task':>6} {'prompt':>6} "
        f"{'boot s':>7} {'prop s':>7} {'search s':>8} {'wall s':>7} {'bound s':>7}"
    )
    print(head)
    print("-" * len(head))
    for conc, block in summary.items():
        for name in ("dspy", "dmipro"):
            agg = block[name]
            ph = agg["phases"]
            bound = f"{agg['lower_bound_s']:7.2f}" if "lower_bound_s" in agg else f"{'-':>7}"
            print(
                f"{conc:>4} {name:<9} {agg['test_score']:6.1f} {agg['val_score']:6.1f} "
                f"{agg['task_lm_calls']:6.0f} {agg['prompt_lm_calls']:6.0f} {ph['bootstrap']['wall_s']:7.2f} "
                f"{ph['propose']['wall_s']:7.2f} {ph['search']['wall_s']:8.2f} {agg['wall_s']:7.2f} {bound}"
            )
    print()
    for conc, block in summary.items():
        r = block["ratios"]
        print(
            f"concurrency {conc}: dmipro/DSPy wall {r['wall_s']:.3f}, task calls {r['task_lm_calls']:.3f}, "
            f"test score {r['test_score_diff']:+.1f} points; "
            f"wall/bound {block['dmipro']['wall_over_bound']:.3f}"
        )
        d = block["dmipro"]
        print(
            f"  bound parts: throughput {d['throughput_bound_s']:.2f} s, depth {d['depth_bound_s']:.2f} s, "
            f"CPU {d['cpu_bound_s']:.2f} s ({d['cpu_s']:.2f} CPU-s / {os.cpu_count()} cores); "
            "wall above each phase's bound: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in d["wall_above_phase_bounds_s"].items())
        )
        seeds = r["test_score_seeds"]
        print(
            f"  test score per seed: dmipro higher on {seeds['dmipro_higher']}, "
            f"DSPy higher on {seeds['dspy_higher']}, equal on {seeds['equal']}"
        )
        for t in block["targets"]:
            mark = "met" if t["met"] else "MISSED"
            print(f"  [{mark}] {t['name']}: {t['measured']} (target {t['target']})")


def plot(summary: dict[str, Any], rows: list[dict[str, Any]], path: Path, latency_ms: float) -> None:
    from bench._plot import pyplot, save

    plt = pyplot()

    concs = list(summary)
    ncols = max(2, len(concs))
    fig = plt.figure(figsize=(5.2 * ncols, 9.0))
    grid = fig.add_gridspec(2, ncols)
    colors = {"bootstrap": "#4c72b0", "propose": "#dd8452", "search": "#55a868", "other": "#b0b0b0"}
    names = ("dspy", "dmipro")
    labels = {"dspy": "dspy.MIPROv2", "dmipro": "dmipro"}

    for col, conc in enumerate(concs):
        ax = fig.add_subplot(grid[0, col])
        block = summary[conc]
        for x, name in enumerate(names):
            agg = block[name]
            bottom = 0.0
            for p in PHASES:
                h = agg["phases"][p]["wall_s"] or 0.0
                ax.bar(x, h, 0.6, bottom=bottom, color=colors[p], label=p if x == 0 else None)
                bottom += h
            other = max(0.0, agg["wall_s"] - bottom)
            ax.bar(x, other, 0.6, bottom=bottom, color=colors["other"], label="other" if x == 0 else None)
            ax.errorbar(x, agg["wall_s"], yerr=agg["wall_s_std"], color="black", capsize=4)
            top = agg["wall_s"] + agg["wall_s_std"]
            ax.text(x, top * 1.01 + 0.05, f"{agg['wall_s']:.2f} s", ha="center", va="bottom")
        bound = block["dmipro"]["lower_bound_s"]
        ax.hlines(
            bound, 0.6, 1.4, colors="crimson", linestyles="--", label=f"dmipro lower bound {bound:.2f} s"
        )
        phase_bound = block["dmipro"]["phase_lower_bound_s"]
        ax.hlines(
            phase_bound,
            0.6,
            1.4,
            colors="purple",
            linestyles=":",
            label=f"dmipro per-phase bound {phase_bound:.2f} s",
        )
        ratio = block["ratios"]["wall_s"]
        target = WALL_TARGETS.get(int(conc), min(WALL_TARGETS.values()))
        ax.set_title(
            f"concurrency {conc}: wall per phase (mean of seeds)\ndmipro/DSPy = {ratio:.2f} "
            f"(target <= {target})"
        )
        ax.set_xticks(range(len(names)), [labels[n] for n in names])
        ax.set_ylabel("seconds")
        ax.set_ylim(0, max(block["dspy"]["wall_s"], block["dmipro"]["wall_s"]) * 1.25)
        ax.legend(fontsize=8, loc="upper right")

    width = 0.38
    ax = fig.add_subplot(grid[1, 0])
    for i, name in enumerate(names):
        xs = [c + (i - 0.5) * width for c in range(len(concs))]
        means = [summary[c][name]["test_score"] for c in concs]
        stds = [summary[c][name]["test_score_std"] for c in concs]
        ax.bar(xs, means, width, yerr=stds, capsize=4, label=labels[name], color=f"C{i}")
        for x, c in zip(xs, concs, strict=True):
            pts = [r["test_score"] for r in rows if r["optimizer"] == name and str(r["concurrency"]) == c]
            ax.scatter([x] * len(pts), pts, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(concs)), [f"concurrency {c}" for c in concs])
    ax.set_ylabel("test exact match (%)")
    ax.set_title("score on the 300 held-out test examples (dots: seeds)")
    ax.set_ylim(0.0, 100.0)
    ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[1, 1])
    for i, name in enumerate(names):
        xs = [c + (i - 0.5) * width for c in range(len(concs))]
        task = [summary[c][name]["task_lm_calls"] for c in concs]
        prompt = [summary[c][name]["prompt_lm_calls"] for c in concs]
        ax.bar(xs, task, width, color=f"C{i}", label=f"{labels[name]} task LM")
        ax.bar(
            xs,
            prompt,
            width,
            bottom=task,
            color=f"C{i}",
            alpha=0.45,
            hatch="//",
            label=f"{labels[name]} prompt LM",
        )
        for x, t, p in zip(xs, task, prompt, strict=True):
            ax.text(x, t + p + 5, f"{t:.0f}+{p:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(concs)), [f"concurrency {c}" for c in concs])
    ax.set_ylabel("LM calls per run (mean of seeds)")
    ax.set_title("LM calls: task (solid) + prompt (hatched)")
    ax.legend(fontsize=8, loc="lower right")

    fig.suptitle(
        f"dmipro vs dspy.MIPROv2, auto=light, math_qa ({TRAIN_SIZE} train / {VAL_SIZE} val / 300 test), "
        f"SimLM {latency_ms:g} ms latency"
    )
    save(fig, path, dpi=110)


# -- main ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=_ints, default=[0, 1, 2, 3, 4], help="comma-separated (default 0,1,2,3,4)"
    )
    parser.add_argument("--concurrency", type=_ints, default=[16, 64], help="comma-separated (default 16,64)")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="simulated LM latency (default 100)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="one seed (the first), for a smoke run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    silence()
    data = {
        "train": examples(records("train", TRAIN_SIZE)),
        "val": examples(records("dev", VAL_SIZE)),
        "test": examples(records("test")),
    }
    rows: list[dict[str, Any]] = []
    load_before = list(os.getloadavg())  # the machine may be shared: say how busy it was
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmipro-bench-") as home:
        os.environ["DMIPRO_HOME"] = home
        reload_settings()
        for conc in args.concurrency:
            for seed in seeds:
                for name in ("dspy", "dmipro"):
                    if name == "dspy":
                        out = run_dspy(seed, conc, args.latency_ms, data)
                    else:
                        out = run_dmipro(seed, conc, args.latency_ms)
                    row = out["row"]
                    row["test_score"] = _round(score_on_test(out["program"], data["test"]))
                    rows.append(row)
                    print(
                        f"c={conc:<3} seed={seed} {name:<7} test {row['test_score']:5.1f}  "
                        f"val {row['val_score']:5.1f}  "
                        f"calls {row['task_lm_calls']}+{row['prompt_lm_calls']}  "
                        f"wall {row['wall_s']:6.2f} s",
                        flush=True,
                    )
    summary = {str(c): summarize(rows, c) for c in args.concurrency}
    report = {
        "benchmark": "compare_dspy",
        "config": {
            "seeds": seeds,
            "concurrency": args.concurrency,
            "latency_ms": args.latency_ms,
            "auto": "light",
            "program": "examples.math_qa.program:build (one ChainOfThought predictor)",
            "trainset": f"first {TRAIN_SIZE} of train.jsonl",
            "valset": f"first {VAL_SIZE} of dev.jsonl",
            "testset": f"all {len(data['test'])} of test.jsonl (seen by neither optimizer)",
            "dmipro_executor": "thread",
            "dspy_version": dspy.__version__,
            "dmipro_version": dmipro.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "score_scale": "exact match, percent (0-100)",
            "bench_wall_s": round(time.perf_counter() - started, 1),
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
        },
        "lower_bound_formula": BOUND_FORMULA,
        "phase_lower_bound_formula": PHASE_BOUND_FORMULA,
        "targets": {
            "test_score": "dmipro mean test score >= DSPy's",
            "task_lm_calls": f"dmipro task-LM calls <= {TASK_CALLS_TARGET}x DSPy's",
            "wall": {str(c): f"dmipro wall <= {t}x DSPy's" for c, t in WALL_TARGETS.items()},
            "lower_bound": f"dmipro wall <= {BOUND_TARGET}x lower_bound_s",
        },
        "summary": summary,
        "all_targets_met": all(t["met"] for block in summary.values() for t in block["targets"]),
        "runs": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / "compare_dspy.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    png_path = args.out_dir / "compare_dspy.png"
    plot(summary, rows, png_path, args.latency_ms)
    print()
    print_table(summary)
    print(f"\nwrote {json_path} and {png_path} ({report['config']['bench_wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
