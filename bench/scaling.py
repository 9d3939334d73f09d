"""dmipro on a Celery fleet: the demo job, one heavy job, and many jobs at once.

Three scenarios (``--scenario``), all on real Celery worker processes, Redis and the job
database (PostgreSQL when ``DMIPRO_TEST_POSTGRES_URL`` names a server):

* ``demo`` (``scaling.json``): the math_qa demo job with 1, 2 and 4 work workers, and the
  per-task overhead; described below.
* ``heavy`` (``scaling_heavy.json``), scenario (a): one ``auto: heavy`` job on the
  three-predictor ``examples.threestage`` program, ``--val-size`` (500) validation
  examples, lognormal simulated latency with a median of ``--latency-ms`` (1000 ms)
  multiplied by ``--latency-scale`` (stated in the results), on 1/2/4/8 work workers of
  ``--slots`` (16) slots each: wall time, slot utilisation, speedup over one worker, and
  the same job on ``dspy.MIPROv2`` in this process with ``num_threads`` = total slots.
* ``many`` (``scaling_many.json``), scenario (b): ``--jobs`` (20) jobs submitted at once
  from ``--apps`` (4) app processes, for each worker count: completion time (makespan),
  each job's slowdown against the same job run alone on the same fleet, max/min slowdown,
  whether every job's result equals its result alone, the work workers' memory (RSS)
  after each job finishes, and jobs per hour.

The ``demo`` scenario:

Every work worker is a Celery thread-pool worker with ``--slots`` (16) slots on the
``dmipro.work`` queue; one more worker runs coordinators (``dmipro.coordinator``). The
simulated LM answers each call after ``--latency-ms`` (100 ms), so the job is I/O-bound
as it is with a hosted model. For each worker count the benchmark submits the math_qa
demo job (``examples/math_qa/job.yaml``, executor concurrency = all work slots) and
reports:

* ``wall_s``: the coordinator's run, from start to finish (``e2e_s`` adds queueing);
* ``lm_calls``, ``tasks`` and ``busy_s``, the summed run time of the work tasks (from the
  workers' "succeeded in" log lines);
* ``utilisation`` = busy_s / (wall_s x slots): the share of slot time spent in tasks;
* ``lm_bound_s`` = lm_calls x latency / slots: the wall time if every slot were always
  waiting on the LM, and ``speedup`` over one worker;
* ``thread_wall_s``: the same job on an in-process thread pool with as many slots, which
  separates what the job's own sequential steps cost from what Celery adds.

Before that it measures the per-task overhead: the median round trip of an empty-ish
task (``evaluate_chunk`` on no examples) through Celery, against the same task inline,
and the throughput of a burst of such tasks.

It starts its own redis-server; the job database is PostgreSQL when
``--database-url`` or ``DMIPRO_TEST_POSTGRES_URL`` names a server (a fresh database is
created), else a SQLite file (all workers run on this machine).

    python bench/scaling.py --workers 1,2,4 --latency-ms 100
    python bench/scaling.py --scenario heavy --workers 1,2,4,8 --latency-scale 0.1
    python bench/scaling.py --scenario many --workers 1,2,4 --jobs 20 --apps 4 --latency-scale 0.1

Writes ``bench/results/scaling[_heavy|_many].json`` and ``.png``; the machine's load
average before and after is in each JSON (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

JOB_FILE = REPO / "examples" / "math_qa" / "job.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
_SUCCEEDED = re.compile(r"Task dmipro\.(?P<task>\w+)\[[^\]]+\] succeeded in (?P<s>[0-9.eE+-]+)s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


class Worker:
    """A Celery worker process with its log file."""

    def __init__(self, env: dict[str, str], logs: Path, queue: str, slots: int, tag: str) -> None:
        self.log = logs / f"{tag}.log"
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "dmipro.workers.celery_app", "worker", "-P", "threads",
             "-c", str(slots), "-Q", queue, "-n", f"{tag}@%h", "--loglevel=INFO", "--without-mingle"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"worker exited:\n{self.log.read_text()[-3000:]}")
        return " ready." in self.log.read_text(errors="replace")

    def offset(self) -> int:
        return self.log.stat().st_size

    def busy_since(self, offset: int) -> tuple[int, float]:
        """(tasks, summed run time) of the work tasks logged after ``offset``."""
        with self.log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        runs = [float(m["s"]) for m in _SUCCEEDED.finditer(text) if m["task"] != "optimize"]
        return len(runs), sum(runs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _demo_spec(latency_ms: float, concurrency: int) -> dict[str, Any]:
    spec = yaml.safe_load(JOB_FILE.read_text())
    sim = {"sim": {"latency_ms": latency_ms}}
    spec["lm"] = {**spec["lm"], **sim}
    spec["prompt_lm"] = {**spec.get("prompt_lm", spec["lm"]), **sim}
    spec["executor"] = {"backend": "celery", "concurrency": concurrency}
    spec.pop("register", None)
    return spec


def _job(spec: dict[str, Any]) -> Any:
    from dmipro.jobs import load_job

    return load_job(spec, base_dir=JOB_FILE.parent)


def _thread_run(latency_ms: float, slots: int) -> float:
    """Wall time of the same job on an in-process thread pool with ``slots`` threads."""
    from dmipro.executor_adapters import ThreadAdapter
    from dmipro.jobs import JobStore
    from dmipro.teleprompt.mipro import run_job

    spec = _demo_spec(latency_ms, slots)
    spec["executor"]["backend"] = "thread"
    job = _job(spec)
    job_id = JobStore().create(name="scaling-thread", spec=job.to_json(), executor="thread").id
    with ThreadAdapter(slots) as ex:
        run_job(job_id, executor=ex)
    record = JobStore().get(job_id)
    return float((record.finished_at or 0.0) - (record.started_at or 0.0))


def _overhead(job_id: str, rounds: int, burst: int) -> dict[str, Any]:
    """Round trip of an evaluate_chunk on no examples: Celery against inline."""
    from dmipro.executor_adapters import InlineAdapter
    from dmipro.executor_adapters.celery import CeleryAdapter

    payload = {"job": job_id, "split": "val", "example_ids": [], "candidate": None}

    def round_trips(ex: Any) -> list[float]:
        ex.submit("evaluate_chunk", payload).result(timeout=60)  # loads the job in the worker
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ex.submit("evaluate_chunk", payload).result(timeout=60)
            times.append(time.perf_counter() - t0)
        return times

    with InlineAdapter() as inline:
        local = round_trips(inline)
    with CeleryAdapter(16) as celery:
        remote = round_trips(celery)
        t0 = time.perf_counter()
        for _ in celery.map("evaluate_chunk", [payload] * burst):
            pass
        burst_s = time.perf_counter() - t0
    p50_remote, p50_local = statistics.median(remote), statistics.median(local)
    return {
        "rounds": rounds,
        "celery_p50_ms": round(p50_remote * 1000, 2),
        "celery_p90_ms": round(sorted(remote)[int(0.9 * (rounds - 1))] * 1000, 2),
        "inline_p50_ms": round(p50_local * 1000, 3),
        "overhead_p50_ms": round((p50_remote - p50_local) * 1000, 2),
        "burst_tasks": burst,
        "burst_tasks_per_s": round(burst / burst_s, 1),
    }


class Fleet:
    """A private redis-server, a job database and Celery worker processes, torn down on exit."""

    def __init__(self, slots: int, coordinator_slots: int = 2, database_url: str | None = None) -> None:
        self.slots = slots
        self.tmp = Path(tempfile.mkdtemp(prefix="dmipro-scaling-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            raise SystemExit("redis-server is not installed")
        self.port = _free_port()
        self.redis = subprocess.Popen(
            [redis_bin, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.server = database_url or os.environ.get("DMIPRO_TEST_POSTGRES_URL")
        self.db_name: str | None = None
        if self.server:
            from sqlalchemy import create_engine, text
            from sqlalchemy.engine import make_url

            self.db_name = f"dmipro_scaling_{uuid.uuid4().hex[:8]}"
            admin = create_engine(self.server, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self.db_name}"'))
            admin.dispose()
            url = make_url(self.server).set(database=self.db_name).render_as_string(hide_password=False)
        else:
            url = f"sqlite:///{self.tmp / 'dmipro.db'}"
        self.settings = {
            "DMIPRO_HOME": str(self.tmp / "home"),
            "DMIPRO_DATABASE_URL": url,
            "DMIPRO_BROKER_URL": f"redis://127.0.0.1:{self.port}/0",
            "DMIPRO_RESULT_BACKEND": f"redis://127.0.0.1:{self.port}/1",
            "DMIPRO_ALLOW_SQLITE_REMOTE": "1",
            "DMIPRO_CONFIG": str(self.tmp / "no-dmipro.yaml"),
        }
        os.environ.update(self.settings)
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("DMIPRO_")}, **self.settings}
        from dmipro.config import reload_settings

        reload_settings()
        self.workers: list[Worker] = [Worker(self.env, self.logs, "dmipro.coordinator", coordinator_slots,
                                             "coordinator")]
        self.work: list[Worker] = []

    @property
    def database(self) -> str:
        return "postgresql" if self.db_name else "sqlite"

    def scale_to(self, n: int) -> None:
        """Start work workers until there are ``n`` (never stops any)."""
        while len(self.work) < n:
            w = Worker(self.env, self.logs, "dmipro.work", self.slots, f"work{len(self.work) + 1}")
            self.work.append(w)
            self.workers.append(w)
        _wait(lambda: all(w.ready() for w in self.workers), 180, "workers to start")

    def stop_work(self) -> None:
        """Stop every work worker (a fresh fleet for the next worker count)."""
        for w in self.work:
            w.stop()
            self.workers.remove(w)
        self.work = []

    def busy(self, offsets: list[int]) -> tuple[int, float]:
        tasks = busy = 0.0
        for w, off in zip(self.work, offsets, strict=False):
            t, b = w.busy_since(off)
            tasks += t
            busy += b
        return int(tasks), busy

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis.terminate()
        self.redis.wait(10)
        if self.db_name and self.server:
            from sqlalchemy import create_engine, text

            from dmipro import db

            for engine in db._engines.values():
                engine.dispose()
            admin = create_engine(self.server, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            admin.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}


def _write(out: dict[str, Any], path: Path, plot: Any) -> None:
    out["load_average_after"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}", flush=True)


# -- scenario demo --------------------------------------------------------------------------


def run_demo(args: argparse.Namespace, counts: list[int]) -> None:
    fleet = Fleet(args.slots, database_url=args.database_url)
    load_before = list(os.getloadavg())
    try:
        fleet.scale_to(1)
        from dmipro.jobs import JobStore
        from dmipro.jobs.submit import submit

        probe = _job(_demo_spec(args.latency_ms, args.slots))
        probe_id = JobStore().create(name="overhead", spec=probe.to_json(), executor="celery").id
        overhead = _overhead(probe_id, args.rounds, args.burst)
        print(f"per-task overhead: {overhead}", flush=True)

        runs = []
        for n in counts:
            fleet.scale_to(n)
            slots = n * args.slots
            offsets = [w.offset() for w in fleet.work]
            t0 = time.perf_counter()
            handle = submit(_job(_demo_spec(args.latency_ms, slots)), executor="celery")
            report = handle.wait(timeout=3600)
            e2e = time.perf_counter() - t0
            if report["state"] != "succeeded":
                raise SystemExit(f"the job {report['state']}: {report['error']}")
            wall = report["finished_at"] - report["started_at"]
            tasks, busy = fleet.busy(offsets)
            lm_bound = report["lm_calls"] * args.latency_ms / 1000 / slots
            thread_wall = _thread_run(args.latency_ms, slots)
            run = {
                "workers": n,
                "slots": slots,
                "wall_s": round(wall, 2),
                "e2e_s": round(e2e, 2),
                "lm_calls": report["lm_calls"],
                "tasks": tasks,
                "busy_s": round(busy, 2),
                "utilisation": round(busy / (wall * slots), 3),
                "lm_bound_s": round(lm_bound, 2),
                "thread_wall_s": round(thread_wall, 2),
                "best_score": report["best_score"],
                "trials": report["trials_done"],
            }
            runs.append(run)
            print(json.dumps(run), flush=True)
        base = runs[0]["wall_s"] * runs[0]["workers"]
        for run in runs:
            run["speedup"] = round(base / run["wall_s"], 2)
            run["ideal_speedup"] = run["workers"]

        out = {
            "benchmark": "scaling",
            "job": str(JOB_FILE.relative_to(REPO)),
            "latency_ms": args.latency_ms,
            "slots_per_worker": args.slots,
            "database": fleet.database,
            "machine": _machine(),
            "load_average_before": load_before,
            "overhead": overhead,
            "runs": runs,
        }
        _write(out, args.out or RESULTS / "scaling.json", _plot)
    finally:
        fleet.close()


# -- scenario (a): one heavy job ----------------------------------------------------------------


HEAVY_PROGRAM = "examples.threestage.program:build"
HEAVY_METRIC = "examples.threestage.program:exact_match"


def _rows(split: str) -> list[dict[str, Any]]:
    path = REPO / "examples" / "math_qa" / "data" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def heavy_data(val_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train: train.jsonl (300). Val: dev.jsonl then test.jsonl, the first ``val_size`` (at most 600)."""
    val = (_rows("dev") + _rows("test"))[:val_size]
    if len(val) < val_size:
        raise SystemExit(f"--val-size {val_size}: only {len(val)} examples exist")
    return _rows("train"), val


def heavy_spec(args: argparse.Namespace, concurrency: int, *, seed: int = 0,
               name: str = "heavy") -> dict[str, Any]:
    train, val = heavy_data(args.val_size)
    sim = {"latency_ms": args.latency_ms * args.latency_scale, "latency_dist": "lognormal",
           "latency_sigma": args.latency_sigma}
    return {
        "name": name,
        "program": HEAVY_PROGRAM,
        "metric": HEAVY_METRIC,
        "trainset": train,
        "valset": val,
        "input_keys": ["question"],
        "lm": {"model": "sim/math", "temperature": 0.0, "sim": sim},
        "prompt_lm": {"model": "sim/math", "temperature": 1.0, "sim": dict(sim)},
        "optimizer": {"auto": args.auto, "seed": seed},
        "executor": {"backend": "celery", "concurrency": concurrency},
    }


def run_dspy_heavy(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """The same job on ``dspy.MIPROv2`` in this process, ``num_threads`` = the fleet's slots."""
    import contextlib
    import io

    import dspy

    from bench.compare_dspy import CountingEngine, counting_lm, silence
    from examples.threestage.program import build, exact_match

    silence()
    train, val = heavy_data(args.val_size)
    ex = [dspy.Example(**r).with_inputs("question") for r in train]
    vx = [dspy.Example(**r).with_inputs("question") for r in val]
    latency = args.latency_ms * args.latency_scale
    task = CountingEngine("math", latency_ms=latency, latency_dist="lognormal",
                          latency_sigma=args.latency_sigma)
    prompt = CountingEngine("math", latency_ms=latency, latency_dist="lognormal",
                            latency_sigma=args.latency_sigma)
    optimizer = dspy.MIPROv2(metric=exact_match, prompt_model=counting_lm(prompt, 1.0),
                             task_model=counting_lm(task, 0.0), auto=args.auto, num_threads=threads, seed=0,
                             verbose=False)
    cpu0, t0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        program = optimizer.compile(build(), trainset=ex, valset=vx)
    return {"num_threads": threads, "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(time.process_time() - cpu0, 2), "task_lm_calls": task.calls,
            "prompt_lm_calls": prompt.calls, "val_score": round(float(getattr(program, "score", 0.0)), 2)}


def run_heavy(args: argparse.Namespace, counts: list[int]) -> None:
    from dmipro.jobs.submit import submit

    dspy_counts = [int(c) for c in args.dspy_workers.split(",") if c.strip()] if args.dspy_workers else []
    fleet = Fleet(args.slots, database_url=args.database_url)
    load_before = list(os.getloadavg())
    runs = []
    try:
        for n in counts:
            fleet.scale_to(n)
            slots = n * args.slots
            offsets = [w.offset() for w in fleet.work]
            cpu0 = {w.proc.pid: _cpu_s(w.proc.pid) for w in fleet.workers}
            t0 = time.perf_counter()
            handle = submit(_job(heavy_spec(args, slots, name=f"heavy-{n}w")), executor="celery")
            report = handle.wait(timeout=4 * 3600)
            e2e = time.perf_counter() - t0
            if report["state"] != "succeeded":
                raise SystemExit(f"the job {report['state']}: {report['error']}")
            wall = report["finished_at"] - report["started_at"]
            tasks, busy = fleet.busy(offsets)
            used = {w: (_cpu_s(w.proc.pid) or 0.0) - (cpu0.get(w.proc.pid) or 0.0) for w in fleet.workers}
            cpu = sum(used.values())
            coordinator_cpu = sum(c for w, c in used.items() if w not in fleet.work)
            # The lognormal's mean, not its median: what a slot waits per call on average.
            latency_s = args.latency_ms * args.latency_scale / 1000 * math.exp(args.latency_sigma ** 2 / 2)
            lm_bound = report["lm_calls"] * latency_s / slots
            cpu_bound = cpu / (os.cpu_count() or 1)
            run: dict[str, Any] = {
                "workers": n, "slots": slots, "wall_s": round(wall, 2), "e2e_s": round(e2e, 2),
                "lm_calls": report["lm_calls"], "tasks": tasks, "busy_s": round(busy, 2),
                "utilisation": round(busy / (wall * slots), 3), "lm_bound_s": round(lm_bound, 2),
                "fleet_cpu_s": round(cpu, 2), "coordinator_cpu_s": round(coordinator_cpu, 2),
                "cpu_bound_s": round(cpu_bound, 2),
                "latency_bound": lm_bound >= cpu_bound,
                "best_score": report["best_score"], "trials": report["trials_done"],
                "load_average": list(os.getloadavg()),
            }
            if n in dspy_counts:
                run["dspy"] = run_dspy_heavy(args, slots)
                run["speedup_vs_dspy"] = round(run["dspy"]["wall_s"] / wall, 2)
            runs.append(run)
            print(json.dumps(run), flush=True)
        base = runs[0]["wall_s"] * runs[0]["workers"]
        for run in runs:
            run["speedup"] = round(base / run["wall_s"], 2)
        targets = []
        by_n = {r["workers"]: r for r in runs}
        one = by_n.get(1)
        for n, target in ((4, 3.2), (8, 5.0)):
            if one and n in by_n:
                r = by_n[n]
                speed = round(one["wall_s"] / r["wall_s"], 2)
                targets.append({"name": f"speedup 1 -> {n} workers while latency-bound",
                                "target": f">= {target}", "measured": speed,
                                "latency_bound": r["latency_bound"], "met": speed >= target})
        out = {
            "benchmark": "scaling_heavy",
            "scenario": "(a) one heavy job",
            "program": HEAVY_PROGRAM + " (3 predictors)",
            "auto": args.auto,
            "val_size": args.val_size,
            "latency": {"distribution": "lognormal", "median_ms_real": args.latency_ms,
                        "scale": args.latency_scale,
                        "median_ms_simulated": args.latency_ms * args.latency_scale,
                        "sigma": args.latency_sigma},
            "slots_per_worker": args.slots,
            "database": fleet.database,
            "machine": _machine(),
            "load_average_before": load_before,
            "runs": runs,
            "targets": targets,
        }
        _write(out, args.out or RESULTS / "scaling_heavy.json", _plot_heavy)
    finally:
        fleet.close()


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its reaped children (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks


# -- scenario (b): many jobs at once ------------------------------------------------------------


_APP = """
import json, sys
from dmipro.config import reload_settings
reload_settings()
from dmipro.jobs import load_job
from dmipro.jobs.submit import submit
specs = json.loads(sys.stdin.read())
ids = [submit(load_job(s), executor="celery").job_id for s in specs]
print(json.dumps(ids))
"""


def many_spec(args: argparse.Namespace, slots: int, seed: int, name: str) -> dict[str, Any]:
    spec = _demo_spec(args.latency_ms * args.latency_scale, slots)
    spec["lm"]["sim"].update(latency_dist="lognormal", latency_sigma=args.latency_sigma)
    spec["prompt_lm"]["sim"].update(latency_dist="lognormal", latency_sigma=args.latency_sigma)
    spec["optimizer"] = {**spec.get("optimizer", {}), "seed": seed}
    spec["name"] = name
    # Paths in the demo job are relative to its file; the app processes load from anywhere.
    for key in ("trainset", "valset", "testset"):
        if isinstance(spec.get(key), str):
            spec[key] = str((JOB_FILE.parent / spec[key]).resolve())
    return spec


def _outcome(job_id: str) -> dict[str, Any]:
    """What must be equal between a job alone and among many: its scores and the chosen prompt."""
    from dmipro.jobs import JobStore

    record = JobStore().get(job_id)
    result = record.result or {}
    return {
        "best_score": result.get("best_score"),
        "baseline_score": result.get("baseline_score"),
        "best_candidate": json.dumps(result.get("best_candidate"), sort_keys=True),
        "wall_s": (record.finished_at or 0.0) - (record.started_at or 0.0),
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "state": record.state.value,
    }


_SAME = ("best_score", "baseline_score", "best_candidate")


def run_many(args: argparse.Namespace, counts: list[int]) -> None:
    from dmipro.jobs.submit import JobHandle, submit

    seeds = list(range(args.distinct))
    fleet = Fleet(args.slots, coordinator_slots=max(args.jobs, 2), database_url=args.database_url)
    load_before = list(os.getloadavg())
    runs = []
    try:
        for n in counts:
            fleet.scale_to(n)
            slots = n * args.slots
            # Each distinct job alone on this fleet: the reference result and time.
            alone: dict[int, dict[str, Any]] = {}
            for seed in seeds:
                h = submit(_job(many_spec(args, slots, seed, f"alone-s{seed}")), executor="celery")
                h.wait(timeout=3600)
                alone[seed] = _outcome(h.job_id)
                print(f"{n} workers: alone seed {seed}: {alone[seed]['wall_s']:.2f} s", flush=True)
            # All jobs at once, from several app processes.
            plan = [(i, seeds[i % len(seeds)]) for i in range(args.jobs)]
            per_app = [plan[a::args.apps] for a in range(args.apps)]
            rss: dict[str, list[float | None]] = {w.log.stem: [_rss_mb(w.proc.pid)] for w in fleet.work}
            t0 = time.time()
            apps = []
            for group in per_app:
                body = json.dumps([many_spec(args, slots, seed, f"many-{i}-s{seed}") for i, seed in group])
                p = subprocess.Popen([sys.executable, "-c", _APP], cwd=REPO, env=fleet.env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                assert p.stdin is not None
                p.stdin.write(body)
                p.stdin.close()
                apps.append((p, group))
            ids: list[tuple[str, int]] = []
            for p, group in apps:
                assert p.stdout is not None
                out = p.stdout.read()
                if p.wait() != 0:
                    raise SystemExit("an app process failed to submit")
                ids += list(zip(json.loads(out.strip().splitlines()[-1]), [s for _, s in group], strict=True))
            pending = {jid for jid, _ in ids}
            while pending:
                for jid in list(pending):
                    if JobHandle(jid).record.state.finished:
                        pending.discard(jid)
                        for w in fleet.work:
                            rss[w.log.stem].append(_rss_mb(w.proc.pid))
                time.sleep(0.2)
            makespan = time.time() - t0
            jobs = []
            for jid, seed in ids:
                o = _outcome(jid)
                ref = alone[seed]
                jobs.append({
                    "seed": seed, "state": o["state"], "wall_s": round(o["wall_s"], 2),
                    "completion_s": round((o["finished_at"] or 0.0) - t0, 2),
                    "slowdown": round(((o["finished_at"] or 0.0) - t0) / ref["wall_s"], 2),
                    "same_result": all(o[k] == ref[k] for k in _SAME),
                    "differs_in": [k for k in _SAME if o[k] != ref[k]],
                    "best_score": o["best_score"],
                })
            slow = [j["slowdown"] for j in jobs]
            growth = {k: (round(v[-1] - v[1], 1) if len(v) > 2 and v[1] and v[-1] else None)
                      for k, v in rss.items()}
            run = {
                "workers": n, "slots": slots, "jobs": args.jobs, "apps": args.apps,
                "makespan_s": round(makespan, 2),
                "jobs_per_hour": round(args.jobs / makespan * 3600, 1),
                "all_succeeded": all(j["state"] == "succeeded" for j in jobs),
                "all_same_as_alone": all(j["same_result"] for j in jobs),
                "slowdown_min": min(slow), "slowdown_max": max(slow),
                "slowdown_spread": round(max(slow) / min(slow), 2),
                "alone_wall_s": {str(s): round(a["wall_s"], 2) for s, a in alone.items()},
                "rss_mb": rss, "rss_growth_mb_after_first_job": growth,
                "jobs_detail": jobs, "load_average": list(os.getloadavg()),
            }
            runs.append(run)
            brief = {k: v for k, v in run.items() if k not in ("jobs_detail", "rss_mb")}
            print(json.dumps(brief), flush=True)
            fleet.stop_work()  # fresh worker processes for the next count
        out = {
            "benchmark": "scaling_many",
            "scenario": f"(b) {args.jobs} jobs submitted at once from {args.apps} app processes",
            "job": str(JOB_FILE.relative_to(REPO)) + f" with seeds 0..{args.distinct - 1}",
            "latency": {"distribution": "lognormal", "median_ms_real": args.latency_ms,
                        "scale": args.latency_scale,
                        "median_ms_simulated": args.latency_ms * args.latency_scale,
                        "sigma": args.latency_sigma},
            "slowdown_definition": "(finish - common submit time) / the same job's wall time alone "
                                   "on the fleet",
            "slots_per_worker": args.slots,
            "database": fleet.database,
            "machine": _machine(),
            "load_average_before": load_before,
            "runs": runs,
            "targets": [
                {"name": "all jobs complete with the same results as alone", "met": all(
                    r["all_succeeded"] and r["all_same_as_alone"] for r in runs)},
                {"name": "max/min per-job slowdown <= 2", "measured": [r["slowdown_spread"] for r in runs],
                 "met": all(r["slowdown_spread"] <= 2 for r in runs)},
            ],
        }
        _write(out, args.out or RESULTS / "scaling_many.json", _plot_many)
    finally:
        fleet.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("demo", "heavy", "many"), default="demo")
    parser.add_argument("--workers", default=None, help="work-worker counts (demo 1,2,4; heavy 1,2,4,8)")
    parser.add_argument("--slots", type=int, default=16, help="thread slots per work worker")
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="LM latency (median for heavy/many) before --latency-scale "
                             "(demo 100, else 1000)")
    parser.add_argument("--latency-scale", type=float, default=0.1,
                        help="heavy/many: simulated latency = latency-ms x this, to finish in minutes")
    parser.add_argument("--latency-sigma", type=float, default=0.5, help="heavy/many: lognormal sigma")
    parser.add_argument("--auto", default="heavy", help="heavy: the auto run mode")
    parser.add_argument("--val-size", type=int, default=500, help="heavy: validation examples")
    parser.add_argument("--dspy-workers", default="1,4",
                        help="heavy: worker counts at which to also run dspy.MIPROv2 (empty: never)")
    parser.add_argument("--jobs", type=int, default=20, help="many: jobs submitted at once")
    parser.add_argument("--apps", type=int, default=4, help="many: app processes submitting them")
    parser.add_argument("--distinct", type=int, default=5,
                        help="many: distinct jobs (seeds), each also run alone")
    parser.add_argument("--rounds", type=int, default=200, help="round trips for the overhead measurement")
    parser.add_argument("--burst", type=int, default=1000, help="tasks in the throughput burst")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server URL to create a database on")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.latency_ms is None:
        args.latency_ms = 100.0 if args.scenario == "demo" else 1000.0
    default_counts = {"demo": "1,2,4", "heavy": "1,2,4,8", "many": "1,2,4"}[args.scenario]
    counts = [int(c) for c in (args.workers or default_counts).split(",")]
    {"demo": run_demo, "heavy": run_heavy, "many": run_many}[args.scenario](args, counts)


def _plot(data: dict[str, Any], path: Path) -> None:
    from bench._plot import pyplot, save

    plt = pyplot()

    runs = data["runs"]
    n = [r["workers"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["wall_s"] for r in runs], "o-", label="measured wall time")
    left.plot(n, [runs[0]["wall_s"] * runs[0]["workers"] / k for k in n], "--", label="ideal (1/workers)")
    left.plot(n, [r["thread_wall_s"] for r in runs], "s-", label="same slots, in-process threads")
    left.plot(n, [r["lm_bound_s"] for r in runs], ":", label="LM-latency bound")
    left.set_xlabel(f"work workers ({data['slots_per_worker']} thread slots each)")
    left.set_ylabel("wall time (s)")
    left.set_xticks(n)
    left.legend()
    left.set_title(f"math_qa demo job, simulated LM {data['latency_ms']:g} ms/call")
    right.bar([str(k) for k in n], [r["utilisation"] * 100 for r in runs])
    right.set_xlabel("work workers")
    right.set_ylabel("slot utilisation (%)")
    o = data["overhead"]
    right.set_title(f"per-task overhead p50 {o['overhead_p50_ms']} ms; "
                    f"burst {o['burst_tasks_per_s']} tasks/s")
    save(fig, path, dpi=120)


def _plot_heavy(data: dict[str, Any], path: Path) -> None:
    from bench._plot import pyplot, save

    plt = pyplot()

    runs = data["runs"]
    n = [r["workers"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(n, [r["wall_s"] for r in runs], "o-", label="dmipro on Celery")
    left.plot(n, [runs[0]["wall_s"] / k for k in n], "--", label="ideal (1/workers)")
    left.plot(n, [r["lm_bound_s"] for r in runs], ":", label="LM-latency bound (calls x L / slots)")
    left.plot(n, [r["cpu_bound_s"] for r in runs], "-.", label="CPU bound (fleet CPU-s / cores)")
    d = [(r["workers"], r["dspy"]["wall_s"]) for r in runs if "dspy" in r]
    if d:
        left.plot([x for x, _ in d], [y for _, y in d], "s", color="crimson",
                  label="dspy.MIPROv2, num_threads = slots")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(n, [str(k) for k in n])
    left.set_xlabel(f"work workers ({data['slots_per_worker']} slots each)")
    left.set_ylabel("wall time (s)")
    lat = data["latency"]
    left.set_title(f"auto={data['auto']}, 3 predictors, {data['val_size']} val, lognormal "
                   f"{lat['median_ms_simulated']:g} ms median", fontsize=9)
    left.legend(fontsize=7)
    right.bar([str(k) for k in n], [r["utilisation"] * 100 for r in runs])
    right.set_xlabel("work workers")
    right.set_ylabel("slot utilisation (%)")
    right.set_title("speedup over 1 worker: " + ", ".join(f"{r['workers']}w {r['speedup']}x" for r in runs),
                    fontsize=9)
    save(fig, path, dpi=120)


def _plot_many(data: dict[str, Any], path: Path) -> None:
    from bench._plot import pyplot, save

    plt = pyplot()

    runs = data["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    n = [r["workers"] for r in runs]
    axes[0].plot(n, [r["jobs_per_hour"] for r in runs], "o-")
    axes[0].set_xlabel("work workers")
    axes[0].set_ylabel("jobs per hour")
    axes[0].set_xticks(n)
    axes[0].set_title(data["scenario"], fontsize=9)
    for i, r in enumerate(runs):
        slow = sorted(j["slowdown"] for j in r["jobs_detail"])
        axes[1].scatter([i] * len(slow), slow, s=12)
    axes[1].set_xticks(range(len(runs)), [f"{r['workers']}w (max/min {r['slowdown_spread']})" for r in runs])
    axes[1].set_ylabel("slowdown vs alone")
    axes[1].set_title("per-job slowdown (finish - submit) / alone", fontsize=9)
    for r in runs:
        for name, series in r["rss_mb"].items():
            axes[2].plot([v for v in series if v is not None], label=f"{r['workers']}w {name}", lw=1)
    axes[2].set_xlabel("jobs finished")
    axes[2].set_ylabel("worker RSS (MiB)")
    axes[2].set_title("work-worker memory as jobs finish", fontsize=9)
    axes[2].legend(fontsize=6)
    save(fig, path, dpi=120)


if __name__ == "__main__":
    main()
