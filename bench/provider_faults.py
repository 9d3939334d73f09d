"""Provider faults against the optimized result: does a flaky or rate-limited provider change it?

One math_qa job (40 validation examples, ``auto: light``, seed 9) runs under each fault,
on the in-process thread executor (16 threads) and on two Celery work workers (8 slots
each, one Redis, so they share one rate limiter):

* ``clean``: no faults;
* ``429_20`` / ``429_50`` / ``429_80``: that share of calls answered 429 with a
  ``Retry-After`` of ``--retry-after-s``, on the task LM and the prompt LM;
* ``500_5``: 5% of calls answered 500; ``timeout_5``: 5% of calls time out;
* ``http_15rps``: ``dmipro sim serve`` enforcing 15 requests/s (``rpm: 900``) over HTTP,
  reached through ``dspy.LM``/litellm, with no limit declared in the job (the fleet
  adapts to the 429s: shared cool-down, AIMD);
* ``http_15rps_declared``: the same with ``lm.rate_limit: {rpm: 900}`` declared.

For each run it reports the best score and whether the best score *and* candidate equal
the clean run's, the 429s the provider sent, dmipro's retries, ``lm_errors``, the time
waited on rate limits and the wall time. The machine may be shared with other work, so
wall times are indicative; the scores are deterministic.

    python bench/provider_faults.py            # both executors, a few minutes
    python bench/provider_faults.py --executors thread

Writes ``bench/results/provider_faults.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).resolve().parent / "results"
KEY_ENV = "DMIPRO_BENCH_SIM_KEY"
RPM = 900


def _scenarios(retry_after_s: float) -> dict[str, dict[str, Any]]:
    def sim(**faults: Any) -> dict[str, Any]:
        return {"sim": {**faults, "retry_after_s": retry_after_s}} if faults else {}

    return {
        "clean": sim(),
        "429_20": sim(rate_limit_rate=0.2),
        "429_50": sim(rate_limit_rate=0.5),
        "429_80": sim(rate_limit_rate=0.8),
        "500_5": sim(server_error_rate=0.05),
        "timeout_5": sim(timeout_rate=0.05),
        "http_15rps": {"http": True},
        "http_15rps_declared": {"http": True, "rate_limit": {"rpm": RPM}},
    }


def _spec(scenario: dict[str, Any], backend: str, concurrency: int, url: str | None) -> dict[str, Any]:
    from tests.fixtures.jobs import math_job

    spec = math_job(40, name="provider_faults", optimizer={"auto": "light", "seed": 9})
    if scenario.get("http"):
        lm = {"model": "openai/sim-math", "api_base": url, "api_key_env": KEY_ENV, "cache": False}
        if "rate_limit" in scenario:
            lm["rate_limit"] = scenario["rate_limit"]
        spec["lm"] = {**lm, "temperature": 0.0}
        spec["prompt_lm"] = {**lm, "temperature": 1.0}
    else:
        spec["lm"] = {"model": "sim/math", "temperature": 0.0, **scenario}
        spec["prompt_lm"] = {"model": "sim/math", "temperature": 1.0, **scenario}
    spec["executor"] = {"backend": backend, "concurrency": concurrency}
    return spec


def _run(spec: dict[str, Any], backend: str) -> dict[str, Any]:
    import dmipro
    from dmipro.jobs import JobStore
    from dmipro.lm.ratelimit import reset

    reset()
    t0 = time.perf_counter()
    if backend == "thread":
        try:
            result = dmipro.optimize(spec)
        except dmipro.DmiproError as exc:
            return {"state": "failed", "error": str(exc), "wall_s": round(time.perf_counter() - t0, 2)}
        out = result.summary()
        out["best_candidate"] = result.best_candidate
        out["state"] = "succeeded"
    else:
        handle = dmipro.submit(spec, executor="celery")
        report = handle.wait(timeout=1800)
        out = dict(report)
        record = JobStore().get(handle.job_id)
        out["best_candidate"] = (record.result or {}).get("best_candidate")
        out["rate_limited"] = (record.result or {}).get("rate_limited")
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executors", default="thread,celery")
    parser.add_argument("--scenarios", default=None, help="comma-separated subset of the scenarios")
    parser.add_argument("--retry-after-s", type=float, default=0.05, help="Retry-After of injected 429s")
    parser.add_argument("--out", type=Path, default=RESULTS / "provider_faults.json")
    args = parser.parse_args(argv)
    executors = args.executors.split(",")
    scenarios = _scenarios(args.retry_after_s)
    if args.scenarios:
        scenarios = {k: v for k, v in scenarios.items() if k in args.scenarios.split(",")}

    tmp = Path(tempfile.mkdtemp(prefix="dmipro-faults-"))
    settings = {
        "DMIPRO_HOME": str(tmp / "home"),
        "DMIPRO_DATABASE_URL": f"sqlite:///{tmp / 'dmipro.db'}",
        "DMIPRO_ALLOW_SQLITE_REMOTE": "1",
        "DMIPRO_ALLOWED_MODULES": "examples,tests",
        "DMIPRO_CONFIG": str(tmp / "no-dmipro.yaml"),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        KEY_ENV: "sk-bench",
    }
    redis = None
    workers: list[Any] = []
    if "celery" in executors:
        from bench.scaling import _free_port

        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            raise SystemExit("redis-server is not installed")
        port = _free_port()
        redis = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        settings["DMIPRO_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
        settings["DMIPRO_RESULT_BACKEND"] = f"redis://127.0.0.1:{port}/1"
    os.environ.update(settings)
    from dmipro.config import reload_settings

    reload_settings()
    from dmipro.lm.server import serve_in_thread

    rows: list[dict[str, Any]] = []
    try:
        if "celery" in executors:
            from bench.scaling import Worker, _wait

            env = {**{k: v for k, v in os.environ.items() if not k.startswith("DMIPRO_")}, **settings,
                   "PYTHONPATH": str(REPO)}
            logs = tmp / "logs"
            logs.mkdir()
            workers.append(Worker(env, logs, "dmipro.coordinator", 2, "coordinator"))
            workers += [Worker(env, logs, "dmipro.work", 8, f"work{i}") for i in (1, 2)]
            _wait(lambda: all(w.ready() for w in workers), 120, "workers to start")
        for backend in executors:
            clean: dict[str, Any] | None = None
            for name, scenario in scenarios.items():
                server = serve_in_thread(rpm=RPM) if scenario.get("http") else None
                try:
                    spec = _spec(scenario, backend, 16, server.url if server else None)
                    out = _run(spec, backend)
                finally:
                    if server is not None:
                        server.shutdown()
                        server.server_close()
                if name == "clean":
                    clean = out
                http_429 = server.stats.get("429", 0) if server else None
                row = {
                    "executor": backend,
                    "scenario": name,
                    "state": out.get("state"),
                    "best_score": out.get("best_score"),
                    "clean_best_score": clean and clean.get("best_score"),
                    "same_best": bool(clean and out.get("best_score") == clean.get("best_score")
                                      and out.get("best_candidate") == clean.get("best_candidate")),
                    "baseline_score": out.get("baseline_score"),
                    "provider_429s": http_429 if http_429 is not None else out.get("rate_limited"),
                    "http_requests": server.stats.get("total") if server else None,
                    "retries": out.get("retries"),
                    "lm_errors": out.get("lm_errors"),
                    "rate_limited_wait_s": out.get("rate_limited_wait_s"),
                    "lm_calls": out.get("lm_calls"),
                    "wall_s": out.get("wall_s"),
                    "error": out.get("error"),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for w in workers:
            w.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    data = {
        "job": "math_qa, 40 val examples, auto light, seed 9; task LM and prompt LM both faulty",
        "retry_after_s": args.retry_after_s,
        "http_limit_rpm": RPM,
        "machine": f"{platform.platform()}, {os.cpu_count()} cores, shared with other work (wall times "
                   "are indicative)",
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    _plot(data, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def _plot(data: dict[str, Any], path: Path) -> None:
    from bench._plot import pyplot, save

    plt = pyplot()

    runs = data["runs"]
    names = list(dict.fromkeys(r["scenario"] for r in runs))
    executors = list(dict.fromkeys(r["executor"] for r in runs))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    width = 0.8 / max(1, len(executors))
    for j, ex in enumerate(executors):
        by = {r["scenario"]: r for r in runs if r["executor"] == ex}
        xs = [i + j * width for i in range(len(names))]
        top.bar(xs, [by.get(n, {}).get("best_score") or 0 for n in names], width, label=ex)
        bottom.bar(xs, [by.get(n, {}).get("wall_s") or 0 for n in names], width, label=ex)
        clean = by.get("clean", {}).get("best_score")
        if clean is not None:
            top.axhline(clean, linestyle="--", linewidth=0.8, color=f"C{j}")
    top.set_ylabel("best score (dashed: clean run)")
    bottom.set_ylabel("wall time (s)")
    bottom.set_xticks([i + width * (len(executors) - 1) / 2 for i in range(len(names))])
    bottom.set_xticklabels(names, rotation=20)
    top.legend()
    top.set_title("Provider faults: best score and wall time (math_qa, light)")
    save(fig, path, dpi=110)


if __name__ == "__main__":
    main()
