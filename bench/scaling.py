"""The demo job on Celery with 1, 2 and 4 work-worker processes.

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

Writes ``bench/results/scaling.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
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
    from dmipro.executor_adapters import ThreadExecutor
    from dmipro.jobs import JobStore
    from dmipro.teleprompt.mipro import run_job

    spec = _demo_spec(latency_ms, slots)
    spec["executor"]["backend"] = "thread"
    job = _job(spec)
    job_id = JobStore().create(name="scaling-thread", spec=job.to_json(), executor="thread").id
    with ThreadExecutor(slots) as ex:
        run_job(job_id, executor=ex)
    record = JobStore().get(job_id)
    return float((record.finished_at or 0.0) - (record.started_at or 0.0))


def _overhead(job_id: str, rounds: int, burst: int) -> dict[str, Any]:
    """Round trip of an evaluate_chunk on no examples: Celery against inline."""
    from dmipro.executor_adapters import InlineExecutor
    from dmipro.executor_adapters.celery import CeleryExecutor

    payload = {"job": job_id, "split": "val", "example_ids": [], "candidate": None}

    def round_trips(ex: Any) -> list[float]:
        ex.submit("evaluate_chunk", payload).result(timeout=60)  # loads the job in the worker
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ex.submit("evaluate_chunk", payload).result(timeout=60)
            times.append(time.perf_counter() - t0)
        return times

    with InlineExecutor() as inline:
        local = round_trips(inline)
    with CeleryExecutor(16) as celery:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="work-worker counts to run")
    parser.add_argument("--slots", type=int, default=16, help="thread slots per work worker")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=200, help="round trips for the overhead measurement")
    parser.add_argument("--burst", type=int, default=1000, help="tasks in the throughput burst")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server URL to create a database on")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="dmipro-scaling-"))
    logs = tmp / "logs"
    logs.mkdir()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed")
    port = _free_port()
    redis = subprocess.Popen([redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = args.database_url or os.environ.get("DMIPRO_TEST_POSTGRES_URL")
    db_name = None
    if server:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        db_name = f"dmipro_scaling_{uuid.uuid4().hex[:8]}"
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        database_url = make_url(server).set(database=db_name).render_as_string(hide_password=False)
    else:
        database_url = f"sqlite:///{tmp / 'dmipro.db'}"
    settings = {
        "DMIPRO_HOME": str(tmp / "home"),
        "DMIPRO_DATABASE_URL": database_url,
        "DMIPRO_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "DMIPRO_RESULT_BACKEND": f"redis://127.0.0.1:{port}/1",
        "DMIPRO_ALLOW_SQLITE_REMOTE": "1",
        "DMIPRO_CONFIG": str(tmp / "no-dmipro.yaml"),
    }
    os.environ.update(settings)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DMIPRO_")}, **settings}
    from dmipro.config import reload_settings

    reload_settings()
    workers: list[Worker] = []
    try:
        workers.append(Worker(env, logs, "dmipro.coordinator", 2, "coordinator"))
        work: list[Worker] = []

        def scale_to(n: int) -> None:
            while len(work) < n:
                w = Worker(env, logs, "dmipro.work", args.slots, f"work{len(work) + 1}")
                work.append(w)
                workers.append(w)
            _wait(lambda: all(w.ready() for w in workers), 120, "workers to start")

        scale_to(1)
        from dmipro.jobs import JobStore
        from dmipro.jobs.submit import submit

        probe = _job(_demo_spec(args.latency_ms, args.slots))
        probe_id = JobStore().create(name="overhead", spec=probe.to_json(), executor="celery").id
        overhead = _overhead(probe_id, args.rounds, args.burst)
        print(f"per-task overhead: {overhead}", flush=True)

        runs = []
        for n in counts:
            scale_to(n)
            slots = n * args.slots
            offsets = [w.offset() for w in work]
            t0 = time.perf_counter()
            handle = submit(_job(_demo_spec(args.latency_ms, slots)), executor="celery")
            report = handle.wait(timeout=3600)
            e2e = time.perf_counter() - t0
            if report["state"] != "succeeded":
                raise SystemExit(f"the job {report['state']}: {report['error']}")
            wall = report["finished_at"] - report["started_at"]
            tasks = busy = 0.0
            for w, off in zip(work, offsets, strict=False):
                t, b = w.busy_since(off)
                tasks += t
                busy += b
            lm_bound = report["lm_calls"] * args.latency_ms / 1000 / slots
            thread_wall = _thread_run(args.latency_ms, slots)
            run = {
                "workers": n,
                "slots": slots,
                "wall_s": round(wall, 2),
                "e2e_s": round(e2e, 2),
                "lm_calls": report["lm_calls"],
                "tasks": int(tasks),
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
            "database": "postgresql" if db_name else "sqlite",
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform()},
            "overhead": overhead,
            "runs": runs,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        _plot(out, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    finally:
        for w in workers:
            w.stop()
        redis.terminate()
        redis.wait(10)
        if db_name and server:
            from sqlalchemy import create_engine, text

            from dmipro import db

            for engine in db._engines.values():
                engine.dispose()
            admin = create_engine(server, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        shutil.rmtree(tmp, ignore_errors=True)


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
