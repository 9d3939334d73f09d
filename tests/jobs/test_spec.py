"""Job specs: every invalid job fails before anything runs or is written; valid jobs load fully."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmipro.errors import DatasetError, JobSpecError, RefError
from dmipro.jobs import JobSpec, RegisterConfig, load_job
from tests.fixtures.jobs import JOB_FILE, REPO, math_job, records

DMIPRO = REPO / ".venv" / "bin" / "dmipro"
UNSET_KEY = "DMIPRO_TEST_UNSET_API_KEY"


def _write_job(directory: Path, spec: dict[str, Any]) -> Path:
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _with(**overrides: Any) -> Callable[[Path], Path]:
    return lambda d: _write_job(d, math_job(5, **overrides))


def _bad_yaml(d: Path) -> Path:
    path = d / "job.yaml"
    path.write_text("name: math_qa\nprogram: examples.math_qa.program:build\ntrainset: [unclosed\n")
    return path


def _empty_dataset(d: Path) -> Path:
    (d / "empty.jsonl").write_text("")
    return _write_job(d, math_job(5, trainset="empty.jsonl"))


def _missing_input(d: Path) -> Path:
    train = records("train", 3)
    del train[1]["question"]
    return _write_job(d, math_job(5, trainset=train))


@dataclass(frozen=True)
class Invalid:
    make: Callable[[Path], Path]
    field: str
    reason: str


INVALID = {
    "bad-yaml": Invalid(_bad_yaml, "job.yaml", "is not valid YAML at line"),
    "missing-file": Invalid(lambda d: d / "absent.yaml", "absent.yaml", "does not exist"),
    "empty-dataset": Invalid(_empty_dataset, "trainset:", "the dataset is empty"),
    "example-missing-input": Invalid(_missing_input, "trainset:", "example 1 lacks ['question']"),
    "unknown-key": Invalid(
        _with(optimizer={"auto": "light", "num_trails": 10}), "optimizer.num_trails:", "unknown key"
    ),
    "unknown-top-level-key": Invalid(_with(dataset="data.jsonl"), "dataset:", "unknown key"),
    "ref-does-not-import": Invalid(
        _with(program="examples.math_qa.nope:build"), "program:", "cannot import 'examples.math_qa.nope'"
    ),
    "ref-not-allowed": Invalid(_with(metric="os:getcwd"), "metric:", "not in DMIPRO_ALLOWED_MODULES"),
    "metric-not-callable": Invalid(
        _with(metric="tests.fixtures.metrics:NOT_CALLABLE"), "metric:", "not a callable metric"
    ),
    "api-key-env-unset": Invalid(
        _with(lm={"model": "openai/gpt-4o-mini", "api_key_env": UNSET_KEY}),
        "lm.api_key_env:",
        f"{UNSET_KEY}, which is not set",
    ),
}
COMMANDS = ["validate", "evaluate"]


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    home: Path
    job_dir: Path
    written: frozenset[str]


def _run_cli(root: Path, case: str, command: str) -> Run:
    job_dir, home = root / case / command / "job", root / case / command / "home"
    job_dir.mkdir(parents=True)
    job = INVALID[case].make(job_dir)
    written = frozenset(p.name for p in job_dir.iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMIPRO_") and k != UNSET_KEY}
    env.update(
        DMIPRO_HOME=str(home),
        DMIPRO_ALLOWED_MODULES="examples,tests",
        DMIPRO_CONFIG=str(root / "no-dmipro.yaml"),
    )
    proc = subprocess.run(
        [str(DMIPRO), command, str(job)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, home, job_dir, written)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Run]:
    """Every invalid job through every command, run as real ``dmipro`` processes side by side."""
    root = tmp_path_factory.mktemp("invalid-jobs")
    keys = [(case, command) for case in INVALID for command in COMMANDS]
    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
        runs = list(pool.map(lambda key: _run_cli(root, *key), keys))
    return dict(zip(keys, runs, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_jobs_exit_2_with_one_line_and_write_nothing(
    cli_runs: dict[tuple[str, str], Run], case: str, command: str
) -> None:
    run, expected = cli_runs[case, command], INVALID[case]
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ")
    assert expected.field in lines[0] and expected.reason in lines[0], lines[0]
    assert run.stdout == ""
    assert not run.home.exists() or not any(run.home.rglob("*")), "the failed command wrote to DMIPRO_HOME"
    assert frozenset(p.name for p in run.job_dir.iterdir()) == run.written


# In process: the same validation, with the field on the exception ------------------------------------


def _nothing_written(home: Path) -> bool:
    return not home.exists() or not any(home.rglob("*"))


@pytest.mark.parametrize("case", [c for c in INVALID if c != "missing-file"])
def test_invalid_jobs_raise_job_spec_errors_naming_the_field(
    tmp_path: Path, dmipro_home: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.delenv(UNSET_KEY, raising=False)
    with pytest.raises(JobSpecError, match=re.escape(INVALID[case].reason)) as info:
        load_job(INVALID[case].make(tmp_path))
    field = INVALID[case].field.rstrip(":")
    if field != "job.yaml":
        assert info.value.field == field
    assert _nothing_written(dmipro_home)


def test_the_shipped_job_file_is_valid(dmipro_home: Path) -> None:
    job = load_job(JOB_FILE)
    spec = job.spec
    assert spec.name == "math_qa" and spec.input_keys == ["question"]
    assert isinstance(spec.trainset, list) and len(spec.trainset) == 300
    assert isinstance(spec.valset, list) and len(spec.valset) == 300
    assert spec.registration == RegisterConfig(name="math_qa", deploy=False)
    assert spec.executor.backend == "thread" and spec.executor.concurrency == 16
    assert spec.lm.model == "sim/math" and spec.effective_prompt_lm.temperature == 1.0
    assert job.base_dir == JOB_FILE.parent
    assert _nothing_written(dmipro_home)


def test_paths_are_relative_to_the_job_file_not_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_dir, elsewhere = tmp_path / "project" / "jobs", tmp_path / "elsewhere"
    (job_dir / "data").mkdir(parents=True)
    elsewhere.mkdir()
    _write_jsonl(job_dir / "data" / "train.jsonl", records("train", 4))
    _write_jsonl(job_dir / "data" / "dev.jsonl", records("dev", 3))
    path = _write_job(job_dir, math_job(trainset="data/train.jsonl", valset="data/dev.jsonl"))
    monkeypatch.chdir(elsewhere)
    job = load_job(Path("..") / "project" / "jobs" / "job.yaml")
    assert job.spec.trainset == records("train", 4) and job.spec.valset == records("dev", 3)
    assert job.base_dir == path.parent.resolve()


def test_a_validated_job_travels_as_json_with_its_data_inline(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", records("train", 4))
    job = load_job(_write_job(tmp_path, math_job(3, trainset="train.jsonl", register={"name": "mq"})))
    data = json.loads(json.dumps(job.to_json()))
    assert data["trainset"] == records("train", 4)
    assert data["register"] == {"name": "mq", "deploy": False}
    assert JobSpec.model_validate(data) == job.spec
    assert load_job(data).spec == job.spec
    assert set(job.data_fingerprints) == {"trainset", "valset"}
    assert load_job(data).data_fingerprints == job.data_fingerprints


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".JSONL"])
def test_dataset_files_in_every_format_load_the_same_records(tmp_path: Path, suffix: str) -> None:
    rows = [{"question": r["question"], "answer": r["answer"]} for r in records("train", 5)]
    rows[0]["question"] = 'A "quoted", comma question, with ünicode? How many?'
    path = tmp_path / f"train{suffix}"
    if suffix.lower() == ".jsonl":
        _write_jsonl(path, rows)
        path.write_text(path.read_text() + "\n\n")  # blank lines are skipped
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        _write_csv(path, rows)
    job = load_job(_write_job(tmp_path, math_job(3, trainset=path.name)))
    assert job.spec.trainset == rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_files_saved_with_a_byte_order_mark_load(tmp_path: Path, suffix: str) -> None:
    # Excel's "CSV UTF-8" and many Windows editors start the file with U+FEFF.
    rows = [{"question": r["question"], "answer": r["answer"]} for r in records("train", 3)]
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        _write_csv(path, rows)
    else:
        _write_jsonl(path, rows)
    path.write_bytes("\ufeff".encode() + path.read_bytes())
    job = load_job(_write_job(tmp_path, math_job(3, trainset=path.name)))
    assert job.spec.trainset == rows


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.jsonl", '{"question": "q", "answer": "1"}\n{not json\n', "line 2 is not JSON"),
        ("train.json", '{"question": "q", "answer": "1"}', "must hold a JSON list"),
        ("train.json", "[1, 2", "cannot read"),
        ("train.jsonl", '"just a string"\n', "record 0 is a str"),
        ("train.csv", "question,answer\n", "the dataset is empty"),
        ("train.txt", "question,answer\n", "neither a data file"),
    ],
    ids=[
        "bad-jsonl-line",
        "json-not-a-list",
        "bad-json",
        "jsonl-not-objects",
        "csv-header-only",
        "unknown-suffix",
    ],
)
def test_unreadable_dataset_files_are_dataset_errors_naming_the_split(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        load_job(_write_job(tmp_path, math_job(3, trainset=name)))
    assert info.value.field == "trainset"
    assert str(info.value).startswith("trainset: ")


def test_a_missing_data_file_says_paths_are_relative_to_the_job(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="relative to the job file") as info:
        load_job(_write_job(tmp_path, math_job(3, valset="data/dev.jsonl")))
    assert info.value.field == "valset"


@pytest.mark.parametrize(
    "ref",
    [
        "tests.fixtures.datasets:load_records",
        "tests.fixtures.datasets:RECORDS",
        "tests.fixtures.datasets:load_examples",
    ],
)
def test_datasets_by_reference(ref: str) -> None:
    from tests.fixtures.datasets import RECORDS

    job = load_job(math_job(3, trainset=ref))
    assert job.spec.trainset == RECORDS


@pytest.mark.parametrize(
    ("ref", "error", "message"),
    [
        ("tests.fixtures.datasets:load_mapping", DatasetError, "gave a dict, expected a list of records"),
        ("os:environ", RefError, "not in DMIPRO_ALLOWED_MODULES"),
        ("tests.fixtures.datasets:missing", RefError, "has no attribute"),
    ],
)
def test_bad_dataset_references(ref: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        load_job(math_job(3, valset=ref))
    assert info.value.field == "valset"  # type: ignore[attr-defined]


def test_inline_lists() -> None:
    train = [
        {
            "question": "Ava has 1 cup. She buys 2 more cups. How many cups does Ava have now?",
            "answer": "3",
            "source": "inline",
        }
    ]
    job = load_job(math_job(2, trainset=train))
    assert job.spec.trainset == train  # extra fields are kept for the metric
    with pytest.raises(DatasetError, match="the dataset is empty"):
        load_job(math_job(2, trainset=[]))
    with pytest.raises(DatasetError, match="plain JSON values"):
        load_job(math_job(2, trainset=[{"question": "q", "answer": {1, 2}}]))


def test_a_missing_label_is_named() -> None:
    valset = records("dev", 3)
    del valset[2]["answer"]
    with pytest.raises(DatasetError, match=r"example 2 lacks \['answer'\]") as info:
        load_job(math_job(valset=valset))
    assert info.value.field == "valset"


def test_input_keys_must_match_the_program() -> None:
    with pytest.raises(JobSpecError, match=r"\['context'\] are not input fields") as info:
        load_job(math_job(3, input_keys=["question", "context"]))
    assert info.value.field == "input_keys"

    two_inputs = math_job(3, program="tests.fixtures.programs:with_context")
    with pytest.raises(JobSpecError, match=r"the program reads \['context'\]") as info:
        load_job(two_inputs)
    assert info.value.field == "input_keys"

    with pytest.raises(JobSpecError, match="duplicates") as info:
        load_job(math_job(3, input_keys=["question", "question"]))
    assert info.value.field == "input_keys"

    with pytest.raises(JobSpecError) as info:
        load_job(math_job(3, input_keys=[]))
    assert info.value.field == "input_keys"


@pytest.mark.parametrize(
    ("where", "key"), [("lm", "api_key"), ("prompt_lm", "API_KEY"), ("lm", "token"), ("lm", "password")]
)
def test_secrets_written_inline_are_refused(where: str, key: str) -> None:
    lm = {"model": "openai/gpt-4o-mini", key: "sk-live-123"}
    with pytest.raises(JobSpecError, match="api_key_env") as info:
        load_job(math_job(3, **{where: lm}))
    assert info.value.field == where
    assert "sk-live-123" not in str(info.value)


@pytest.mark.parametrize(
    "lm",
    [
        {"model": "openai/gpt-4o-mini", "extra_headers": {"Authorization": "Bearer sk-live-123"}},
        {"model": "openai/gpt-4o-mini", "extra_body": {"api_key": "sk-live-123"}},
    ],
    ids=["header", "nested-key"],
)
def test_secrets_nested_in_lm_options_are_refused(lm: dict[str, Any]) -> None:
    # Job specs travel to workers and into the job database; a key inside them leaks.
    with pytest.raises(JobSpecError, match="api_key_env") as info:
        load_job(math_job(3, lm=lm))
    assert info.value.field is not None and info.value.field.startswith("lm")
    assert "sk-live-123" not in str(info.value)


def test_api_key_env_that_is_set_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMIPRO_TEST_SET_API_KEY", "sk-test")
    job = load_job(math_job(3, lm={"model": "openai/gpt-4o-mini", "api_key_env": "DMIPRO_TEST_SET_API_KEY"}))
    assert job.spec.lm.api_key_env == "DMIPRO_TEST_SET_API_KEY"
    assert "sk-test" not in json.dumps(job.to_json())


@pytest.mark.parametrize(
    ("lm", "message"),
    [
        ({"model": "sim/math", "sim": {"latency": 10}}, "unknown simulator option"),
        ({"model": "openai/gpt-4o-mini", "sim": {"latency_ms": 10}}, "only to sim/"),
    ],
)
def test_simulator_options_are_checked(lm: dict[str, Any], message: str) -> None:
    with pytest.raises(JobSpecError, match=message) as info:
        load_job(math_job(3, lm=lm))
    assert info.value.field == "lm.sim"


def test_the_register_block() -> None:
    job = load_job(math_job(3, register={"name": "math_qa", "deploy": True}))
    assert job.spec.registration == RegisterConfig(name="math_qa", deploy=True)
    assert load_job(math_job(3)).spec.registration is None
    with pytest.raises(JobSpecError) as info:
        load_job(math_job(3, register={"name": "math_qa", "when": "better"}))
    assert info.value.field == "register.when"


@pytest.mark.parametrize(
    ("program", "message"),
    [
        ("tests.fixtures.programs:not_a_module", "returned a str, expected a dspy.Module"),
        ("tests.fixtures.programs:NotAModule", "is a class that is not a dspy.Module"),
        ("tests.fixtures.programs:needs_an_argument", "must be callable with no arguments"),
        ("tests.fixtures.programs:raises", "raised RuntimeError: factory exploded"),
        ("tests.fixtures.programs:no_predictors", "no predictors"),
        ("examples.math_qa.program:MathQA.__doc__", "names the private attribute"),
    ],
)
def test_program_refs_must_give_a_dspy_module(program: str, message: str) -> None:
    with pytest.raises(RefError, match=message) as info:
        load_job(math_job(3, program=program))
    assert info.value.field == "program"


def test_a_program_instance_is_accepted() -> None:
    assert load_job(math_job(3, program="tests.fixtures.programs:INSTANCE")).spec.program.endswith(
        ":INSTANCE"
    )


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"optimizer": {"auto": "light", "num_trials": 10}}, "optimizer", "auto sets num_candidates"),
        ({"optimizer": {"auto": None, "num_trials": 10}}, "optimizer", "give both"),
        ({"optimizer": {"auto": "extreme"}}, "optimizer.auto", None),
        ({"executor": {"backend": "dask"}}, "executor.backend", None),
        ({"executor": {"concurrency": 0}}, "executor.concurrency", None),
        ({"name": "has spaces"}, "name", None),
        ({"metric": None}, "metric", None),
    ],
)
def test_settings_are_checked(overrides: dict[str, Any], field: str, message: str | None) -> None:
    with pytest.raises(JobSpecError, match=message) as info:
        load_job(math_job(3, **overrides))
    assert info.value.field == field


def test_a_required_key_that_is_missing() -> None:
    spec = math_job(3)
    del spec["metric"]
    with pytest.raises(JobSpecError, match="metric: required key is missing"):
        load_job(spec)


def test_a_job_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("- a\n- list\n")
    with pytest.raises(JobSpecError, match="mapping"):
        load_job(path)
