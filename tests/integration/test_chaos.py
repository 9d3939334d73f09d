"""Chaos with real services: Redis and PostgreSQL restarted, messages lost, workers killed, a poison task.

Every test here owns what it breaks: a private redis-server it kills and restarts on
the same port, a private PostgreSQL cluster (initdb into a temporary directory, its own
port) it restarts, and the Celery and RQ worker processes it starts and SIGKILLs. The
shared PostgreSQL on 5433 only holds this module's job database and is never touched.

Each case ends like a clean run (same best score and candidate, same trial log and LM
call count: nothing lost, nothing counted twice) or in a clear failed state. The workers
run with a 5-second visibility timeout and a reconciler every second with a 2-second
grace, so what would take minutes in production takes seconds here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dmipro.config import reload_settings
from dmipro.executor_adapters import ThreadAdapter
from dmipro.jobs import JobStore, load_job
from dmipro.jobs.submit import JobHandle, JobTimeoutError, submit
from dmipro.teleprompt.mipro import run_job
from tests.conftest import free_port, need
from tests.contract.workers import (
    WorkerProcess,
    base_env,
    celery_worker,
    create_database,
    drop_database,
    rq_worker,
    wait_for,
)
from tests.fixtures.poison import COUNTER, POISON_ENV
from tests.integration.conftest import scored, small_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRIALS = 8
VISIBILITY_TIMEOUT_S = 5
QUEUES = {"coordinator": "dmipro.coordinator", "work": "dmipro.work"}


# -- services the tests own -------------------------------------------------------------


@dataclass
class PrivateRedis:
    """A redis-server on its own port, without persistence: a restart loses everything in it."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            need("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, 10, "redis-server to accept connections")

    def _up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        """A crash and a restart on the same port: every queue, result and lease is gone."""
        self.kill()
        self.start()

    def client(self, db: int) -> Any:
        import redis

        return redis.Redis.from_url(f"{self.url}/{db}")


PG_BINDIR = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name)


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of the test's own (initdb, own port), run as the ``postgres`` user."""

    bindir: Path
    datadir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, *args: str) -> None:
        argv = " ".join([str(self.bindir / args[0]), *args[1:]])
        subprocess.run(
            ["su", "postgres", "-s", "/bin/sh", "-c", argv], check=True, capture_output=True, timeout=120
        )

    def init(self) -> None:
        self._pg(
            "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )

    def start(self) -> None:
        opts = f"'-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off'"
        self._pg(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-o",
            opts,
            "-l",
            str(self.datadir / "server.log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """A crash (immediate stop: no checkpoint, sessions cut) and a restart with recovery."""
        self.stop("immediate")
        self.start()


@dataclass
class Chaos:
    """The module's services and the workers of the running test."""

    redis: PrivateRedis
    database_url: str
    home: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def env(self, backend: str, **extra: str) -> dict[str, str]:
        broker = {
            "celery": {
                "DMIPRO_BROKER_URL": f"{self.redis.url}/0",
                "DMIPRO_RESULT_BACKEND": f"{self.redis.url}/1",
            },
            "rq": {
                "DMIPRO_BROKER_URL": f"{self.redis.url}/2",
                "DMIPRO_RESULT_BACKEND": f"{self.redis.url}/2",
            },
        }
        return base_env(
            self.database_url,
            self.home,
            DMIPRO_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT_S),
            DMIPRO_RECONCILE_INTERVAL="1",
            DMIPRO_RECONCILE_GRACE="2",
            **broker[backend],
            **extra,
        )

    def use(self, backend: str, monkeypatch: pytest.MonkeyPatch, database_url: str | None = None) -> None:
        env = self.env(backend)
        for key in ("DMIPRO_BROKER_URL", "DMIPRO_RESULT_BACKEND", "DMIPRO_VISIBILITY_TIMEOUT"):
            monkeypatch.setenv(key, env[key])
        monkeypatch.setenv("DMIPRO_DATABASE_URL", database_url or self.database_url)
        reload_settings()

    def start(
        self, backend: str, role: str, *, database_url: str | None = None, **extra: str
    ) -> WorkerProcess:
        env = self.env(backend, **extra)
        if database_url:
            env["DMIPRO_DATABASE_URL"] = database_url
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        if backend == "celery":
            worker = celery_worker(
                env,
                logs,
                queues=QUEUES[role],
                concurrency=2 if role == "coordinator" else 4,
                tag=f"chaos-{role}",
            )
        else:
            worker = rq_worker(env, logs, queues=QUEUES[role], tag=f"chaos-rq-{role}")
        self.workers.append(worker.start())
        return worker

    def ready(self) -> None:
        for worker in self.workers:
            if worker.alive:
                worker.wait_ready()

    def logs(self) -> str:
        return "\n\n".join(f"--- {w.name}\n{w.log_tail(40)}" for w in self.workers)

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.alive and worker.proc is not None:
                worker.proc.terminate()
        for worker in self.workers:
            worker.stop(timeout=10)
        self.workers.clear()


@pytest.fixture(scope="module")
def chaos_services(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chaos]:
    server = request.getfixturevalue("postgres_server_url")
    home = tmp_path_factory.mktemp("chaos")
    redis = PrivateRedis(free_port(), home)
    redis.start()
    url, name = create_database(server)
    try:
        yield Chaos(redis, url, home)
    finally:
        redis.kill()
        drop_database(server, name)


@pytest.fixture
def chaos(chaos_services: Chaos, monkeypatch: pytest.MonkeyPatch) -> Iterator[Chaos]:
    """The module's Redis (flushed) and job database; the test's workers are stopped afterwards."""
    for db in range(3):
        chaos_services.redis.client(db).flushdb()
    chaos_services.use("celery", monkeypatch)
    try:
        yield chaos_services
    finally:
        chaos_services.stop_workers()


# -- the job and its clean run ------------------------------------------------------------


def chaos_job(**overrides: Any) -> dict[str, Any]:
    job = small_job(latency_ms=100.0, num_trials=TRIALS)
    job.update(overrides)
    return job


_REFERENCE: dict[str, Any] = {}


def reference() -> dict[str, Any]:
    """The same job run cleanly in this process (latency changes no answer, so it is left out)."""
    if not _REFERENCE:
        job = load_job(small_job(num_trials=TRIALS))
        record = JobStore().create(name="reference", spec=job.to_json(), executor="thread")
        with ThreadAdapter(4) as ex:
            run_job(record.id, executor=ex)
        _REFERENCE.update(JobStore().get(record.id).result or {})
    return _REFERENCE


def finish(handle: JobHandle, chaos: Chaos, timeout: float = 150) -> dict[str, Any]:
    try:
        report = handle.wait(timeout=timeout)
    except JobTimeoutError as exc:
        pytest.fail(f"{exc}\n{chaos.logs()}")
    assert report["state"] == "succeeded", (report, chaos.logs())
    return report


def assert_like_a_clean_run(job_id: str, *, resumed: bool = False) -> dict[str, Any]:
    """Same trials, best score and candidate as the clean run; same trial log and LM calls too
    unless the coordinator was ``resumed`` (the calls of its first life are not in its usage)."""
    result = JobStore().get(job_id).result or {}
    expected = reference()
    assert result["trials"] == expected["trials"] == TRIALS
    assert result["best_score"] == expected["best_score"]
    assert result["best_candidate"] == expected["best_candidate"]
    if resumed:
        minibatch = [t for t in result["trial_logs"].values() if not t["full_eval"]]
        assert len(minibatch) == TRIALS
        states = study_states(job_id)  # no trial told twice or left running
        assert states.count("COMPLETE") == len(result["trial_logs"]) and "RUNNING" not in states
    else:
        assert result["trial_logs"] == expected["trial_logs"]
        assert result["lm_calls"] == expected["lm_calls"]  # each task's result counted once
    return result


def study_states(job_id: str) -> list[str]:
    import optuna

    study = optuna.load_study(
        study_name=f"dmipro:{job_id}", storage=JobStore().engine.url.render_as_string(hide_password=False)
    )
    return [t.state.name for t in study.trials]


# -- c. the coordinator's message lost ------------------------------------------------------


def test_celery_a_lost_coordinator_message_is_sent_again(chaos: Chaos) -> None:
    reference()
    chaos.start("celery", "work")
    chaos.ready()
    handle = submit(chaos_job(), executor="celery")
    broker = chaos.redis.client(0)
    assert broker.llen("dmipro.coordinator") == 1
    broker.delete("dmipro.coordinator")  # lost: no worker will ever take it
    coordinator = chaos.start("celery", "coordinator")
    report = finish(handle, chaos)
    assert report["attempts"] == 1
    assert broker.get(f"dmipro:resent:{handle.job_id}") == b"1"  # sent again once, not while it ran
    assert "its coordinator message was lost" in coordinator.log_tail(400)
    assert_like_a_clean_run(handle.job_id)


def test_rq_a_lost_coordinator_message_is_sent_again(chaos: Chaos, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmipro.executor_adapters.rq import coordinator_job_id

    chaos.use("rq", monkeypatch)
    reference()
    chaos.start("rq", "work")
    chaos.start("rq", "work")
    chaos.ready()
    handle = submit(chaos_job(), executor="rq")
    broker = chaos.redis.client(2)
    rq_id = coordinator_job_id(handle.job_id)
    assert broker.lrem("rq:queue:dmipro.coordinator", 0, rq_id) == 1
    broker.delete(f"rq:job:{rq_id}")
    coordinator = chaos.start("rq", "coordinator")
    report = finish(handle, chaos)
    assert report["attempts"] == 1
    assert broker.get(f"dmipro:resent:{handle.job_id}") == b"1"
    assert "its coordinator message was lost" in coordinator.log_tail(400)
    assert_like_a_clean_run(handle.job_id)


# -- d. an RQ work worker SIGKILLed mid-job ------------------------------------------------------


def test_rq_a_killed_work_worker_loses_no_trial(chaos: Chaos, monkeypatch: pytest.MonkeyPatch) -> None:
    chaos.use("rq", monkeypatch)
    reference()
    chaos.start("rq", "coordinator")
    victim = chaos.start("rq", "work")
    chaos.start("rq", "work")
    chaos.ready()
    handle = submit(chaos_job(), executor="rq")
    wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
    victim.kill()  # its running task stays "started" in RQ, held by a worker that is gone
    report = finish(handle, chaos)
    assert report["attempts"] == 1  # the coordinator never stopped
    assert_like_a_clean_run(handle.job_id)


def test_rq_a_killed_coordinator_worker_is_resumed(chaos: Chaos, monkeypatch: pytest.MonkeyPatch) -> None:
    chaos.use("rq", monkeypatch)
    reference()
    victim = chaos.start("rq", "coordinator")
    chaos.start("rq", "work")
    chaos.start("rq", "work")
    chaos.ready()
    handle = submit(chaos_job(), executor="rq")
    wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
    victim.kill()
    chaos.start("rq", "coordinator")  # its reconciler finds the job unleased, its worker dead
    report = finish(handle, chaos)
    assert report["attempts"] == 2  # resumed once
    result = assert_like_a_clean_run(handle.job_id, resumed=True)
    assert result["phases"]["bootstrap"]["resumed"] and result["phases"]["propose"]["resumed"]


# -- e. a poison task ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["celery", "rq"])
def test_a_poison_task_fails_the_job_once_with_its_reason(
    chaos: Chaos, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chaos.use(backend, monkeypatch)
    chaos.start(backend, "coordinator")
    chaos.start(backend, "work", **{POISON_ENV: "1"})
    chaos.ready()
    handle = submit(chaos_job(program="tests.fixtures.poison:build"), executor=backend)
    try:
        report = handle.wait(timeout=90)
    except JobTimeoutError as exc:
        pytest.fail(f"{exc}\n{chaos.logs()}")
    assert report["state"] == "failed"
    assert "poisoned" in report["error"] and "RuntimeError" in report["error"], report["error"]
    assert report["attempts"] == 1
    broker = chaos.redis.client(0 if backend == "celery" else 2)
    ran = int(broker.get(COUNTER) or 0)
    assert ran >= 1
    # Past the visibility timeout and several reconciler passes: nothing ran again, nothing re-sent.
    time.sleep(VISIBILITY_TIMEOUT_S + 3)
    assert int(broker.get(COUNTER) or 0) == ran
    assert broker.get(f"dmipro:resent:{handle.job_id}") is None
    after = JobStore().get(handle.job_id)
    assert after.state.value == "failed" and after.attempts == 1 and after.error == report["error"]


# -- a. Redis restarted mid-job ------------------------------------------------------------


def test_celery_redis_restarted_mid_job(chaos: Chaos) -> None:
    reference()
    chaos.start("celery", "coordinator")
    chaos.start("celery", "work")
    chaos.ready()
    handle = submit(chaos_job(), executor="celery")
    wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
    chaos.redis.restart()  # queues, unacknowledged messages, results and the lease: all gone
    report = finish(handle, chaos)
    assert report["attempts"] == 1  # the coordinator rode it out
    assert_like_a_clean_run(handle.job_id)
    assert all(w.alive for w in chaos.workers), chaos.logs()  # no worker gave up on the lost connection


def test_rq_redis_restarted_mid_job(chaos: Chaos, monkeypatch: pytest.MonkeyPatch) -> None:
    chaos.use("rq", monkeypatch)
    reference()
    chaos.start("rq", "coordinator")
    chaos.start("rq", "work")
    chaos.start("rq", "work")
    chaos.ready()
    handle = submit(chaos_job(), executor="rq")
    wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
    chaos.redis.restart()
    report = finish(handle, chaos)
    assert report["attempts"] == 1
    assert_like_a_clean_run(handle.job_id)
    assert all(w.alive for w in chaos.workers), chaos.logs()


# -- b. PostgreSQL restarted mid-job ----------------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[PrivateCluster]:
    """A PostgreSQL cluster of this test's own, in a temporary directory owned by ``postgres``."""
    if not PG_BINDIR or os.geteuid() != 0 or shutil.which("su") is None:
        need("a private PostgreSQL cluster needs /usr/lib/postgresql/*/bin and root (to run as postgres)")
    try:
        import pwd

        owner = pwd.getpwnam("postgres")
    except KeyError:
        need("no postgres user (scripts/services.sh creates it)")
    datadir = Path(tempfile.mkdtemp(prefix="dmipro-chaos-pg-"))
    os.chown(datadir, owner.pw_uid, owner.pw_gid)
    cluster = PrivateCluster(PG_BINDIR[-1], datadir, free_port())
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        finally:
            shutil.rmtree(datadir, ignore_errors=True)


def test_celery_postgres_restarted_mid_job(
    chaos: Chaos, private_postgres: PrivateCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, name = create_database(private_postgres.url)
    try:
        chaos.use("celery", monkeypatch, database_url=url)
        reference()
        chaos.start("celery", "coordinator", database_url=url)
        chaos.start("celery", "work", database_url=url)
        chaos.ready()
        handle = submit(chaos_job(), executor="celery")
        wait_for(lambda: scored(handle.job_id, 10), 120, "trials to be running", interval=0.02)
        private_postgres.restart()
        report = finish(handle, chaos)
        assert_like_a_clean_run(handle.job_id, resumed=report["attempts"] > 1)
    finally:
        drop_database(private_postgres.url, name)
