"""``MIPROv2.compile`` on Celery or RQ: the caller's objects become a job spec, then a job.

Workers on other machines get JSON only, so everything ``compile`` was given is turned
into what a job spec holds, and anything that cannot be is refused before anything is
written or queued, naming the object and what to pass instead:

- the student, metric and teacher: importable references (a program object is accepted
  when its class or factory, imported, rebuilds exactly its state);
- the examples: ``dspy.Example`` objects whose fields are all JSON, with one set of input
  keys; the error names the split, the index and the field;
- the task and prompt LMs: ``dspy.LM`` model and settings (API keys stay in the workers'
  environment; an LM holding a key is refused);
- the caller's DSPy settings: a built-in adapter crosses by name, JSON flags cross as they
  are; callbacks and other objects are refused.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from dmipro.errors import OptimizerArgumentError, RefError
from dmipro.executor_adapters import ExecutorAdapter
from dmipro.jobs._load import instantiate
from dmipro.jobs.runtime import ADAPTERS, capture_dspy_settings
from dmipro.jobs.spec import OptimizerConfig
from dmipro.jobs.submit import JobHandle, submit
from dmipro.lm import callbacks as lm_callbacks
from dmipro.refs import ref_of
from dmipro.teleprompt.result import json_trial_logs

if TYPE_CHECKING:  # mipro.py imports this module for its remote path
    from dmipro.teleprompt.mipro import MIPROv2

__all__ = ["compile_remote", "remote_spec"]


def _program_ref(obj: Any, what: str) -> str:
    """A reference that rebuilds ``obj``: a ref string as given, a factory or class, or a module whose
    class rebuilds exactly its state."""
    import dspy


    if isinstance(obj, str):
        return obj
    target = type(obj) if isinstance(obj, dspy.Module) else obj
    try:
        ref = ref_of(target, field=what)
    except RefError as exc:
        raise OptimizerArgumentError(
            f"{what} must be importable for remote workers: pass a 'package.module:attr' reference to a "
            f"factory that builds it ({exc})"
        ) from None
    if isinstance(obj, dspy.Module):
        try:
            rebuilt = instantiate(ref, field=what)
        except Exception as exc:
            raise OptimizerArgumentError(
                f"{what}: {ref} does not rebuild the program ({exc}); pass a reference to its factory"
            ) from None
        if rebuilt.dump_state() != obj.dump_state():
            raise OptimizerArgumentError(
                f"{what}: the program object differs from what {ref} builds (instructions, demos or "
                "fields changed); pass a reference to a factory that builds this program"
            )
    return ref


def _metric_ref(metric: Any) -> str:
    if isinstance(metric, str):
        return metric
    try:
        return ref_of(metric, field="metric")
    except RefError as exc:
        raise OptimizerArgumentError(
            f"the metric must be importable for remote workers (a module-level function, not a lambda or "
            f"a function in __main__): {exc}"
        ) from None


def _records(examples: list[Any], split: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The examples as JSON records and their input keys; every problem names split, index and field."""
    records: list[dict[str, Any]] = []
    keys: list[str] | None = None
    for i, example in enumerate(examples):
        where = f"{split}[{i}]"
        try:
            inputs = sorted(example.inputs().keys())
            data = example.toDict()
        except (AttributeError, ValueError) as exc:
            raise OptimizerArgumentError(
                f"{where} must be a dspy.Example with .with_inputs(...): {exc}"
            ) from None
        if keys is None:
            keys = inputs
        elif inputs != keys:
            raise OptimizerArgumentError(
                f"{where} has input keys {inputs}, but {split}[0] has {keys}; remote workers take one set of "
                "input keys for every example"
            )
        for field, value in data.items():
            if not _is_json(value):
                raise OptimizerArgumentError(
                    f"{where}.{field} is not JSON ({type(value).__name__}); remote workers receive examples "
                    "as JSON: store plain values and rebuild objects in the metric, or use executor='thread'"
                )
        records.append(data)
    return records, keys or []


def _lm_config(lm: Any, what: str) -> dict[str, Any]:
    """An ``lm:`` block from a ``dspy.LM``; secrets never go into it."""
    model = getattr(lm, "model", None)
    if not isinstance(model, str):
        raise OptimizerArgumentError(f"{what} must be a dspy.LM for remote workers, not {type(lm).__name__}")
    kwargs = dict(getattr(lm, "kwargs", {}) or {})
    if any(k in kwargs for k in ("api_key", "api_token")):
        raise OptimizerArgumentError(
            f"{what} holds an API key, which never travels to workers: build the LM without api_key and set "
            "the provider's key variable (e.g. OPENAI_API_KEY) where the workers run, or use a job spec "
            "with api_key_env"
        )
    config: dict[str, Any] = {"model": model}
    for key, value in kwargs.items():
        if value is None:
            continue
        if not _is_json(value):
            raise OptimizerArgumentError(f"{what}: setting {key!r} is not JSON and cannot reach workers")
        config[key] = value
    for key in ("cache", "num_retries"):
        if getattr(lm, key, None) is not None:
            config[key] = getattr(lm, key)
    engine: Any = getattr(lm, "engine", None)
    if model.startswith("sim/") and hasattr(engine, "options"):
        defaults = type(engine)().options
        sim = {k: v for k, v in engine.options.items() if k != "task" and v != defaults.get(k)}
        if sim:
            config["sim"] = sim
    return config


def _crossing_settings(captured: dict[str, Any]) -> dict[str, Any]:
    """The caller's DSPy settings that differ from DSPy's defaults, as JSON; the rest refused."""
    import dspy
    from dspy.dsp.utils.settings import DEFAULT_CONFIG


    out: dict[str, Any] = {}
    for key, value in captured.items():
        if key in DEFAULT_CONFIG and _same(value, DEFAULT_CONFIG[key]):
            continue
        if key == "adapter":
            name = type(value).__name__
            if (
                name in ADAPTERS
                and type(value) is getattr(dspy, name)
                and _same(vars(value), vars(type(value)()))
            ):
                out[key] = name
                continue
            raise OptimizerArgumentError(
                f"the DSPy adapter in force ({name}, or one with changed settings) cannot reach remote "
                f"workers; they can use {', '.join(ADAPTERS)} with default settings, or use executor='thread'"
            )
        if key == "callbacks":
            own = lm_callbacks.callback()
            theirs = [cb for cb in value or [] if cb is not own]
            if not theirs:
                continue
            raise OptimizerArgumentError(
                f"DSPy callbacks in force ({', '.join(type(cb).__name__ for cb in theirs)}) are Python "
                "objects and cannot reach remote workers; install them in the worker processes, or use "
                "executor='thread'"
            )
        if not _is_json(value):
            raise OptimizerArgumentError(
                f"the DSPy setting {key!r} ({type(value).__name__}) is not JSON and cannot reach remote "
                "workers"
            )
        out[key] = value
    return out


def _is_json(value: Any) -> bool:
    """Whether ``value`` is plain JSON (what a job spec, and so a remote worker, can carry)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def remote_spec(
    opt: MIPROv2,
    student: Any,
    *,
    trainset: list[Any],
    valset: list[Any] | None,
    teacher: Any,
    optimizer: OptimizerConfig,
    backend: str,
    provide_traceback: bool | None,
) -> dict[str, Any]:
    """The job spec ``compile`` submits; raises OptimizerArgumentError for what cannot cross."""
    if opt.teacher_settings:
        raise OptimizerArgumentError(
            "teacher_settings hold Python objects that cannot reach remote workers; give the teacher "
            "program (an importable reference) its own LM instead, or use executor='thread'"
        )
    train, keys = _records(list(trainset), "trainset")
    spec: dict[str, Any] = {
        "name": opt.name,
        "program": _program_ref(student, "student"),
        "metric": _metric_ref(opt.metric),
        "trainset": train,
        "input_keys": keys,
        "lm": _lm_config(opt.task_model, "task_model"),
        "prompt_lm": _lm_config(opt.prompt_model, "prompt_model"),
        "executor": {"backend": backend, "concurrency": opt.num_threads or 16},
    }
    if valset is not None:
        val, val_keys = _records(list(valset), "valset")
        if val_keys != keys:
            raise OptimizerArgumentError(
                f"valset input keys {val_keys} differ from trainset's {keys}; remote workers take one set"
            )
        spec["valset"] = val
    settings = optimizer.model_dump(mode="json", exclude_defaults=True)
    if teacher is not None:
        settings["teacher"] = _program_ref(teacher, "teacher")
    spec["optimizer"] = {"auto": optimizer.auto, **settings}
    captured = capture_dspy_settings()
    if provide_traceback is not None:
        captured["provide_traceback"] = provide_traceback
    crossing = _crossing_settings(captured)
    if crossing:
        spec["dspy_settings"] = crossing
    return spec


def compile_remote(
    opt: MIPROv2,
    student: Any,
    *,
    trainset: list[Any],
    valset: list[Any] | None,
    teacher: Any,
    optimizer: OptimizerConfig,
    executor: str | ExecutorAdapter,
    provide_traceback: bool | None,
    job_id: str | None,
) -> Any:
    """Submit the job to ``executor``'s workers, wait for it and return the optimized program."""
    backend = executor.name if isinstance(executor, ExecutorAdapter) else executor
    spec = remote_spec(
        opt,
        student,
        trainset=trainset,
        valset=valset,
        teacher=teacher,
        optimizer=optimizer,
        backend=backend,
        provide_traceback=provide_traceback,
    )
    handle: JobHandle = submit(spec, executor=backend, job_id=job_id)
    report = handle.wait()
    program = handle.result()  # raises, naming the job's error, unless it succeeded
    if opt.track_stats:
        record = handle.record
        program.score = report["best_score"]
        stored = (record.result or {}).get("trial_logs") or {}
        program.trial_logs = json_trial_logs(
            {int(k): v for k, v in stored.items()},
            val_size=len((record.result or {}).get("val_ids") or []),
            minibatch_size=optimizer.minibatch_size,
        )
        program.stats = {**report, "phases": (record.result or {}).get("phases")}
        program.job_id = handle.job_id
    return program
