"""Complete validation of a job before anything runs or is written."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dmipro.errors import DatasetError, JobSpecError, RefError
from dmipro.jobs._datasets import fingerprint_records, load_records
from dmipro.jobs._limits import check_caps
from dmipro.jobs._policy import check_lm_policy
from dmipro.jobs.spec import JobSpec, LMConfig
from dmipro.lm import SIM_OPTIONS
from dmipro.refs import ensure_importable, import_ref, trusted_code_paths

__all__ = ["Job", "JobSource", "instantiate", "load_job", "parse_spec", "required_fields", "resolve_job"]


@dataclass(frozen=True)
class Job:
    """A validated job: the spec with every dataset inlined, ready to send to a worker."""

    spec: JobSpec
    base_dir: Path

    def to_json(self) -> dict[str, Any]:
        """The materialized spec as JSON data (datasets inline, no paths)."""
        return self.spec.model_dump(mode="json")

    @property
    def data_fingerprints(self) -> dict[str, str]:
        out = {}
        for split in ("trainset", "valset", "testset"):
            records = getattr(self.spec, split)
            if isinstance(records, list):
                out[split] = fingerprint_records(records)
        return out


def parse_spec(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """Read a job file (YAML, ``safe_load``) or take a dict; return it with its base directory."""
    if isinstance(source, dict):
        return copy.deepcopy(source), Path.cwd()
    path = Path(source)
    if not path.is_file():
        raise JobSpecError(f"job file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise JobSpecError(f"{path} is not valid YAML{where}: {problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise JobSpecError(f"{path} must hold a mapping of job settings at the top level")
    return data, path.resolve().parent


def _spec_error(exc: ValidationError) -> JobSpecError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return JobSpecError("unknown key; remove it or check its spelling", field=loc)
    if err["type"] == "missing":
        return JobSpecError("required key is missing", field=loc)
    msg = err["msg"].removeprefix("Value error, ")
    return JobSpecError(msg, field=loc or None)


def instantiate(ref: str, *, field: str = "program") -> Any:
    """Import a program reference through the allowlist and return a fresh ``dspy.Module`` from it.

    A module instance is deep-copied (the shared object is never changed); a class or a
    factory is called with no arguments. Every way this fails is a :class:`RefError` naming
    ``field``. The one builder of programs from references: job validation, runtimes,
    ``compile`` and storage (:func:`dmipro.storage.build_program` loads a record's state
    into what this returns) all use it.
    """
    import dspy

    obj = import_ref(ref, field=field)
    if isinstance(obj, dspy.Module):
        return obj.deepcopy()
    if isinstance(obj, type) and not issubclass(obj, dspy.Module):
        raise RefError(f"{ref} is a class that is not a dspy.Module", field=field)
    if not callable(obj):
        raise RefError(
            f"{ref} is a {type(obj).__name__}; expected a dspy.Module or a zero-argument factory", field=field
        )
    try:
        program = obj()
    except TypeError as exc:
        raise RefError(f"{ref} must be callable with no arguments ({exc})", field=field) from exc
    except Exception as exc:
        raise RefError(f"{ref}() raised {type(exc).__name__}: {exc}", field=field) from exc
    if not isinstance(program, dspy.Module):
        raise RefError(f"{ref}() returned a {type(program).__name__}, expected a dspy.Module", field=field)
    return program


def required_fields(program: Any) -> tuple[set[str], set[str]]:
    """(inputs, labels) a dataset must hold for ``program``.

    Inputs are fields some predictor reads that no predictor writes; labels are the
    last predictor's outputs (what the metric compares), minus free-text reasoning.
    """
    predictors = [p for _, p in program.named_predictors()]
    if not predictors:
        raise RefError("the program has no predictors to optimize", field="program")
    reads = {k for p in predictors for k in p.signature.input_fields}
    writes = {k for p in predictors for k in p.signature.output_fields}
    labels = set(predictors[-1].signature.output_fields) - {"reasoning"}
    return reads - writes, labels


def _check_lm(cfg: LMConfig, field: str) -> None:
    check_lm_policy(cfg, field, remote=False)
    if cfg.api_key_env and cfg.api_key_env not in os.environ:
        raise JobSpecError(
            f"api_key_env names {cfg.api_key_env}, which is not set in the environment; export it first",
            field=f"{field}.api_key_env",
        )
    if cfg.is_sim:
        unknown = sorted(set(cfg.sim or {}) - set(SIM_OPTIONS))
        if unknown:
            raise JobSpecError(
                f"unknown simulator option(s) {unknown}; known: {sorted(SIM_OPTIONS)}", field=f"{field}.sim"
            )
    elif cfg.sim is not None:
        raise JobSpecError("sim options apply only to sim/* models", field=f"{field}.sim")


def load_job(source: str | Path | dict[str, Any], *, base_dir: Path | None = None) -> Job:
    """Validate a job completely and return it with its datasets inlined.

    Raises a :class:`~dmipro.errors.JobSpecError` (or subclass) naming the field and the
    fix for the first problem found; nothing is written either way.
    """
    data, found_dir = parse_spec(source)
    base = (base_dir or found_dir).resolve()
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(exc) from None
    check_caps(spec)  # counts first: nothing is imported or loaded for a job this machine will not run
    ensure_importable(trusted_code_paths())  # never ``base``: a job bundle must not shadow real code
    program = instantiate(spec.program)
    metric = import_ref(spec.metric, field="metric")
    if not callable(metric):
        raise RefError(f"{spec.metric} is a {type(metric).__name__}, not a callable metric", field="metric")
    if spec.optimizer.teacher is not None:  # every ref in a job is checked here, not first on a worker
        instantiate(spec.optimizer.teacher, field="optimizer.teacher")
    _check_lm(spec.lm, "lm")
    if spec.prompt_lm is not None:
        _check_lm(spec.prompt_lm, "prompt_lm")

    inputs, labels = required_fields(program)
    extra_keys = sorted(set(spec.input_keys) - inputs)
    if extra_keys:
        raise JobSpecError(
            f"{extra_keys} are not input fields of the program (its inputs: {sorted(inputs)})",
            field="input_keys",
        )
    missing_keys = sorted(inputs - set(spec.input_keys))
    if missing_keys:
        raise JobSpecError(f"the program reads {missing_keys}; add them to input_keys", field="input_keys")

    update: dict[str, Any] = {}
    for split in ("trainset", "valset", "testset"):
        source_value = getattr(spec, split)
        if source_value is None:
            continue
        records = load_records(source_value, base_dir=base, field=split)
        for i, rec in enumerate(records):
            absent = sorted((inputs | labels) - set(rec))
            if absent:
                raise DatasetError(
                    f"example {i} lacks {absent}; every example needs the inputs {sorted(inputs)} "
                    f"and the labels {sorted(labels)}",
                    field=split,
                )
        update[split] = records
    spec = spec.model_copy(update=update)
    check_caps(spec)
    return Job(spec=spec, base_dir=base)


JobSource = str | Path | dict[str, Any] | Job
"""What every entry point takes as a job: a YAML or JSON path, a dict, or a loaded :class:`Job`."""


def resolve_job(source: JobSource) -> Job:
    """A validated :class:`Job` from a path, a dict or a Job."""
    return source if isinstance(source, Job) else load_job(source)
