"""What a worker needs to run a job's tasks, loaded once per process and job.

A :class:`JobRuntime` holds the job's program factory, metric, examples and LMs. The
coordinator registers the runtime it built; a worker in another process that sees an
unknown job id loads the spec from the job database and builds its own, importing the
program and metric only through the allowlist.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dmipro._heap import freeze_loaded
from dmipro.config import get_settings
from dmipro.errors import JobSpecError, OptimizationError
from dmipro.jobs._datasets import fingerprint_records
from dmipro.jobs._limits import check_caps
from dmipro.jobs._load import Job, instantiate
from dmipro.jobs._policy import check_lm_policy
from dmipro.jobs.candidate import Candidate, apply_candidate, demo_dict, fingerprint
from dmipro.jobs.plan import RunPlan, default_split, plan_run
from dmipro.jobs.spec import JobSpec
from dmipro.jobs.store import JobStore
from dmipro.lm import build_lm, callbacks
from dmipro.lm._shared_cache import share_cache
from dmipro.refs import import_ref

__all__ = [
    "ADAPTERS",
    "MAX_RUNTIMES",
    "JobRuntime",
    "capture_dspy_settings",
    "check_plan",
    "forget_runtime",
    "get_runtime",
    "plan_for",
    "register_runtime",
    "settings_of",
    "shared_limit_url",
]

SPLITS = {"train": "trainset", "val": "valset", "test": "testset"}
_PROGRAM_CACHE_SIZE = 256

# Per-call state DSPy keeps in its settings: each task sets its own (``lm`` per task,
# a fresh ``trace``, dmipro's usage meter), so the caller's values must not leak in.
_PER_CALL_SETTINGS = frozenset(
    {"lm", "trace", "usage_tracker", "caller_predict", "caller_modules", "send_stream", "stream_listeners"}
)


ADAPTERS = ("ChatAdapter", "JSONAdapter", "XMLAdapter")
"""DSPy adapters a job spec names (``dspy_settings.adapter``); built with their defaults."""


def settings_of(spec: JobSpec) -> dict[str, Any]:
    """The DSPy settings a job spec carries, as ``dspy.context`` takes them (adapter built)."""
    import dspy

    settings = dict(spec.dspy_settings or {})
    adapter = settings.get("adapter")
    if adapter is not None:
        if adapter not in ADAPTERS:
            raise JobSpecError(
                f"unknown adapter {adapter!r}; one of {', '.join(ADAPTERS)}", field="dspy_settings.adapter"
            )
        settings["adapter"] = getattr(dspy, adapter)()
    return settings


def capture_dspy_settings() -> dict[str, Any]:
    """The caller's DSPy settings (``dspy.configure`` under ``dspy.context``), minus per-call state.

    Worker threads start with DSPy's global configuration only: ``dspy.context`` lives in a
    context variable that new threads do not inherit. A runtime applies what this returns
    around every task, so the adapter, callbacks and flags the caller set reach each call.
    """
    import dspy

    return {k: v for k, v in dspy.settings.copy().items() if k not in _PER_CALL_SETTINGS}


class JobRuntime:
    """A job's program, metric, examples and LMs, ready to run tasks. Thread-safe."""

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        *,
        program: Any = None,
        metric: Any = None,
        task_lm: Any = None,
        prompt_lm: Any = None,
        examples: dict[str, list[Any]] | None = None,
        teacher: Any = None,
        teacher_settings: dict[str, Any] | None = None,
        dspy_settings: dict[str, Any] | None = None,
        remote: bool = False,
    ) -> None:
        """Build from the spec's references, or from objects given in-process (``MIPROv2.compile``).

        In-process, ``examples`` are the caller's own ``dspy.Example`` objects by split, used
        as they are (each keeps its own input keys and field values); ``teacher`` is a program
        object and ``teacher_settings`` DSPy settings for bootstrapping with it;
        ``dspy_settings`` (see :func:`capture_dspy_settings`) is applied around every task.
        ``remote``: the job came from the job database to a worker, so the worker's own rules
        for key variables, endpoints and sizes apply (:mod:`dmipro.jobs._policy`).
        """
        import dspy


        # Before anything is imported or built: a refused job costs the worker nothing.
        if remote:

            check_caps(spec)
        check_lm_policy(spec.lm, "lm", remote=remote)
        check_lm_policy(spec.effective_prompt_lm, "prompt_lm" if spec.prompt_lm else "lm", remote=remote)
        self.job_id = job_id
        self.spec = spec
        self.in_process = program is not None or metric is not None
        self.metric = metric if metric is not None else import_ref(spec.metric, field="metric")
        self._base = program.deepcopy() if program is not None else instantiate(spec.program)
        self._teacher = teacher
        self.teacher_settings = dict(teacher_settings or {})
        self.dspy_settings = dict(dspy_settings if dspy_settings is not None else settings_of(spec))
        self.examples: dict[str, list[Any]] = {}
        if examples is not None:
            self.examples = {split: list(items) for split, items in examples.items()}
        for split, attr in SPLITS.items():
            records = getattr(spec, attr)
            if isinstance(records, list) and split not in self.examples:
                self.examples[split] = [dspy.Example(**r).with_inputs(*spec.input_keys) for r in records]
        if "val" not in self.examples:

            # DSPy's rule: without a valset, the last 80% of the trainset validates.
            cut, _ = default_split(len(self.examples["train"]))
            self.examples["train"], self.examples["val"] = (
                self.examples["train"][:cut],
                self.examples["train"][cut:],
            )
        shared = shared_limit_url(spec)
        self.task_lm = task_lm if task_lm is not None else build_lm(spec.lm, shared_url=shared)
        self.prompt_lm = (
            prompt_lm if prompt_lm is not None else build_lm(spec.effective_prompt_lm, shared_url=shared)
        )
        self._share_caches(task_lm is None, prompt_lm is None)
        self._lock = threading.Lock()
        self._programs: OrderedDict[str, Any] = OrderedDict()
        freeze_loaded()  # the program, DSPy and the LMs are loaded: keep them out of the GC's walks

    def _share_caches(self, task: bool, prompt: bool) -> None:
        """Route the LMs whose config says ``cache: shared`` to the fleet's Redis cache."""

        url = get_settings().broker_url
        if task and self.spec.lm.cache == "shared":
            share_cache(self.task_lm, self.job_id, url)
        if prompt and self.spec.effective_prompt_lm.cache == "shared":
            share_cache(self.prompt_lm, self.job_id, url)

    def fresh_program(self) -> Any:
        """A new copy of the program as written (no optimization applied)."""
        return self._base.deepcopy()

    def teacher_program(self) -> Any | None:
        """The job's teacher program, if it has one (else BootstrapFewShot uses the student)."""
        if self._teacher is not None:
            return self._teacher.deepcopy()
        ref = self.spec.optimizer.teacher
        return instantiate(ref, field="optimizer.teacher") if ref else None

    @contextmanager
    def context(self, **overrides: Any) -> Iterator[None]:
        """``dspy.context`` with the caller's captured settings, then ``overrides`` (``lm=...``)."""
        import dspy


        settings = {**self.dspy_settings, **overrides}
        own = callbacks.callback()
        # The caller's callbacks replace DSPy's global list, as dspy.context does; dmipro's
        # own LM-call callback (observability) stays, or its spans and counts would vanish.
        given = settings.get("callbacks")
        if given is not None and callbacks.installed() and not any(cb is own for cb in given):
            settings["callbacks"] = [*given, own]
        with dspy.context(**settings):
            yield

    def program_for(self, candidate: Candidate | None) -> Any:
        """The program with ``candidate`` applied; shared per candidate (do not mutate it)."""
        key = fingerprint(candidate)
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
                return program
        program = apply_candidate(self.fresh_program(), candidate)
        with self._lock:
            self._programs[key] = program
            while len(self._programs) > _PROGRAM_CACHE_SIZE:
                self._programs.popitem(last=False)
        return program

    def data_fingerprints(self) -> dict[str, str]:
        """A short content hash per split, for the stored program's metadata."""

        return {k: fingerprint_records([demo_dict(e) for e in v]) for k, v in self.examples.items()}

    def split(self, name: str) -> list[Any]:
        try:
            return self.examples[name]
        except KeyError:
            raise JobSpecError(
                f"the job has no {name} split; add {SPLITS.get(name, name)}: to the job",
                field=SPLITS.get(name),
            ) from None


def shared_limit_url(spec: JobSpec) -> str | None:
    """The Redis every worker of a remote job shares its rate limits through (None: this process only).

    Workers of a Celery or RQ job already share a broker; its Redis (or the result
    backend's, when the broker is not Redis) holds the limiter, so the fleet stays under
    one limit together.
    """
    if spec.executor.backend not in ("celery", "rq"):
        return None

    settings = get_settings()
    for url in (settings.broker_url, settings.result_backend):
        if url.startswith(("redis://", "rediss://", "unix://")):
            return url
    return None


MAX_RUNTIMES = 16
"""Runtimes a process keeps; beyond it the least recently used one rebuilt from the database goes."""

_lock = threading.Lock()
_runtimes: OrderedDict[str, JobRuntime] = OrderedDict()


def register_runtime(job_id: str, spec: JobSpec, *, remote: bool = False, **objects: Any) -> JobRuntime:
    """Build (or reuse) the runtime for ``job_id`` in this process; ``objects`` as for JobRuntime.

    A long-lived worker serves many jobs, so the cache is bounded: runtimes that can be
    rebuilt from the job database are evicted least recently used first; in-process ones
    (``MIPROv2.compile``'s objects) stay until ``forget_runtime``.
    """
    with _lock:
        runtime = _runtimes.get(job_id)
        if runtime is None or objects:
            runtime = _runtimes[job_id] = JobRuntime(job_id, spec, remote=remote, **objects)
        _runtimes.move_to_end(job_id)
        rebuildable = [k for k, r in _runtimes.items() if not r.in_process]
        for key in rebuildable[: max(0, len(_runtimes) - MAX_RUNTIMES)]:
            del _runtimes[key]
        return runtime


def get_runtime(job_id: str) -> JobRuntime:
    """The runtime for ``job_id``: this process's, or one built from the job database."""
    with _lock:
        runtime = _runtimes.get(job_id)
        if runtime is not None:
            _runtimes.move_to_end(job_id)
    if runtime is not None:
        return runtime

    spec = JobSpec.model_validate(JobStore().job_spec(job_id))
    return register_runtime(job_id, spec, remote=True)


def forget_runtime(job_id: str) -> None:
    """Drop a job's runtime from this process (when the job is finished)."""
    with _lock:
        _runtimes.pop(job_id, None)


def plan_for(runtime: JobRuntime) -> RunPlan:
    """The run plan of a job (sizes, trials, validation ids); raises OptimizationError if it cannot run."""
    opt = runtime.spec.optimizer
    val_size = len(runtime.split("val"))
    if val_size < 2:
        raise OptimizationError(f"the valset has {val_size} example; MIPROv2 needs at least 2")
    return plan_run(
        auto=opt.auto,
        num_candidates=opt.num_candidates,
        num_trials=opt.num_trials,
        num_predictors=len(runtime.fresh_program().named_predictors()),
        val_size=val_size,
        max_bootstrapped_demos=opt.max_bootstrapped_demos,
        max_labeled_demos=opt.max_labeled_demos,
        minibatch=opt.minibatch,
        minibatch_size=opt.minibatch_size,
        minibatch_full_eval_steps=opt.minibatch_full_eval_steps,
        seed=opt.seed,
    )


def check_plan(job: Job) -> None:
    """Raise before anything is written if MIPROv2 cannot run this job (sizes, settings)."""
    plan_for(JobRuntime("check", job.spec))
