"""What a worker needs to run a job's tasks, loaded once per process and job.

A :class:`JobRuntime` holds the job's program factory, metric, examples and LMs. The
coordinator registers the runtime it built; a worker in another process that sees an
unknown job id loads the spec from the job database and builds its own, importing the
program and metric only through the allowlist.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from dmipro.errors import JobSpecError
from dmipro.jobs._load import build_program
from dmipro.jobs.candidate import Candidate, apply_candidate, fingerprint
from dmipro.jobs.spec import JobSpec
from dmipro.refs import import_ref

__all__ = ["MAX_RUNTIMES", "JobRuntime", "forget_runtime", "get_runtime", "register_runtime"]

SPLITS = {"train": "trainset", "val": "valset", "test": "testset"}
_PROGRAM_CACHE_SIZE = 256


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
    ) -> None:
        """Build from the spec's references, or from objects given in-process (``MIPROv2.compile``)."""
        import dspy

        from dmipro.lm import build_lm

        self.job_id = job_id
        self.spec = spec
        self.in_process = program is not None or metric is not None
        self.metric = metric if metric is not None else import_ref(spec.metric, field="metric")
        self._base = program.deepcopy() if program is not None else build_program(spec.program)
        self.examples: dict[str, list[Any]] = {}
        for split, attr in SPLITS.items():
            records = getattr(spec, attr)
            if isinstance(records, list):
                self.examples[split] = [dspy.Example(**r).with_inputs(*spec.input_keys) for r in records]
        if "val" not in self.examples:
            from dmipro.teleprompt._plan import default_split

            # DSPy's rule: without a valset, the last 80% of the trainset validates.
            cut, _ = default_split(len(self.examples["train"]))
            self.examples["train"], self.examples["val"] = (
                self.examples["train"][:cut],
                self.examples["train"][cut:],
            )
        self.task_lm = task_lm if task_lm is not None else build_lm(spec.lm)
        self.prompt_lm = prompt_lm if prompt_lm is not None else build_lm(spec.effective_prompt_lm)
        self._share_caches(task_lm is None, prompt_lm is None)
        self._lock = threading.Lock()
        self._programs: OrderedDict[str, Any] = OrderedDict()

    def _share_caches(self, task: bool, prompt: bool) -> None:
        """Route the LMs whose config says ``cache: shared`` to the fleet's Redis cache."""
        from dmipro.config import get_settings
        from dmipro.lm._shared_cache import share_cache

        url = get_settings().broker_url
        if task and self.spec.lm.cache == "shared":
            share_cache(self.task_lm, self.job_id, url)
        if prompt and self.spec.effective_prompt_lm.cache == "shared":
            share_cache(self.prompt_lm, self.job_id, url)

    def fresh_program(self) -> Any:
        """A new copy of the program as written (no optimization applied)."""
        return self._base.deepcopy()

    def teacher_program(self) -> Any | None:
        """The job's teacher program, if it names one (else BootstrapFewShot uses the student)."""
        ref = self.spec.optimizer.teacher
        return build_program(ref, field="optimizer.teacher") if ref else None

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
        from dmipro.jobs._datasets import fingerprint_records
        from dmipro.jobs.candidate import demo_dict

        return {k: fingerprint_records([demo_dict(e) for e in v]) for k, v in self.examples.items()}

    def split(self, name: str) -> list[Any]:
        try:
            return self.examples[name]
        except KeyError:
            raise JobSpecError(
                f"the job has no {name} split; add {SPLITS.get(name, name)}: to the job",
                field=SPLITS.get(name),
            ) from None


MAX_RUNTIMES = 16
"""Runtimes a process keeps; beyond it the least recently used one rebuilt from the database goes."""

_lock = threading.Lock()
_runtimes: OrderedDict[str, JobRuntime] = OrderedDict()


def register_runtime(job_id: str, spec: JobSpec, **objects: Any) -> JobRuntime:
    """Build (or reuse) the runtime for ``job_id`` in this process; ``objects`` as for JobRuntime.

    A long-lived worker serves many jobs, so the cache is bounded: runtimes that can be
    rebuilt from the job database are evicted least recently used first; in-process ones
    (``MIPROv2.compile``'s objects) stay until ``forget_runtime``.
    """
    with _lock:
        runtime = _runtimes.get(job_id)
        if runtime is None or objects:
            runtime = _runtimes[job_id] = JobRuntime(job_id, spec, **objects)
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
    from dmipro.jobs.store import JobStore

    spec = JobSpec.model_validate(JobStore().get(job_id).spec)
    return register_runtime(job_id, spec)


def forget_runtime(job_id: str) -> None:
    """Drop a job's runtime from this process (when the job is finished)."""
    with _lock:
        _runtimes.pop(job_id, None)
