"""The registry on SQLite and PostgreSQL: versions, deploy, rollback, history, diff, load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import dmipro.registry as registry
from dmipro.config import reload_settings
from dmipro.errors import NotFoundError, RegistryError, StorageError
from dmipro.events import Event, bus
from dmipro.registry import Registry
from dmipro.storage import DatabaseProgramStore, ProgramRecord
from tests.storage.programs import optimized, predictions

REF = "examples.math_qa.program:build"
REPO = Path(__file__).resolve().parents[2]


def _record(score: float | None = 80.0, instruction: str | None = None, n_demos: int = 3) -> ProgramRecord:
    program = optimized(instruction, n_demos) if instruction else optimized(n_demos=n_demos)
    return ProgramRecord.from_program(program, program_ref=REF, best_score=score, job_id="job-7")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_versions_are_numbered_and_immutable(database_url: str) -> None:
    reg = Registry()
    infos = [reg.register("math_qa", _record(float(s))) for s in (60, 70, 65)]
    assert [i.version for i in infos] == [1, 2, 3]
    assert len({i.program_id for i in infos}) == 3
    assert [v.best_score for v in reg.versions("math_qa")] == [60.0, 70.0, 65.0]
    assert reg.get("math_qa@2").metadata.best_score == 70.0
    [name] = reg.list_names()
    assert (name.name, name.latest_version, name.deployed_version) == ("math_qa", 3, None)


def test_a_program_already_in_the_database_store_registers_by_id(database_url: str) -> None:
    record = _record(77.0)
    program_id = DatabaseProgramStore().save(record)
    info = registry.register("math_qa", program_id)
    assert (info.version, info.program_id, info.best_score) == (1, program_id, 77.0)
    assert registry.get("math_qa@1") == record
    with pytest.raises(NotFoundError, match="no stored program"):
        registry.register("math_qa", "0" * 32)
    assert [v.version for v in registry.versions("math_qa")] == [1]


def test_rollback_restores_the_previously_deployed_version(database_url: str) -> None:
    reg = Registry()
    for i in range(3):
        reg.register("math_qa", _record(60.0 + i, instruction=f"Instruction number {i}."))
    reg.deploy("math_qa", 1, actor="alice")
    reg.deploy("math_qa", 3, actor="bob")
    assert reg.get("math_qa") == reg.get("math_qa@3")
    back = reg.rollback("math_qa", actor="carol")
    assert (back.from_version, back.to_version) == (3, 1)
    assert reg.get("math_qa") == reg.get("math_qa@1")
    assert reg.load("math_qa").predict.signature.instructions == "Instruction number 0."
    history = reg.history("math_qa")
    assert [(h.action, h.from_version, h.to_version, h.actor) for h in history] == [
        ("deploy", None, 1, "alice"),
        ("deploy", 1, 3, "bob"),
        ("rollback", 3, 1, "carol"),
    ]
    with pytest.raises(RegistryError, match="nothing to roll back|no earlier deployment"):
        reg.rollback("math_qa")


def test_rollbacks_walk_back_through_deployments(database_url: str) -> None:
    reg = Registry()
    for _ in range(3):
        reg.register("qa", _record(), deploy=True)
    assert reg.show("qa").version == 3
    assert reg.rollback("qa").to_version == 2
    assert reg.rollback("qa").to_version == 1
    assert reg.deploy("qa", 1) is None  # already deployed: nothing recorded
    assert len(reg.history("qa")) == 5


def test_auto_deploy_follows_the_margin(database_url: str, tmp_path: Path) -> None:
    reg = Registry()
    assert reg.register("off", _record(90.0)).deployed is False  # auto_deploy is off by default
    config = Path(os.environ["DMIPRO_CONFIG"])
    config.write_text("registry:\n  auto_deploy: true\n  deploy_margin: 2.0\n")
    reload_settings()
    assert reg.register("qa", _record(70.0)).deployed  # nothing deployed yet
    assert not reg.register("qa", _record(71.5)).deployed  # +1.5 < margin
    assert reg.register("qa", _record(72.0)).deployed  # +2.0 >= margin
    assert not reg.register("qa", _record(None)).deployed  # no score: never automatic
    assert not reg.register("qa", _record(99.0), deploy=False).deployed
    assert reg.register("qa", _record(10.0), deploy=True).deployed
    assert [h.to_version for h in reg.history("qa")] == [1, 3, 6]


def test_load_errors_say_what_is_missing(database_url: str) -> None:
    with pytest.raises(NotFoundError, match="no program named 'ghost'"):
        registry.load("ghost")
    registry.register("math_qa", _record())
    with pytest.raises(NotFoundError, match="nothing of 'math_qa' is deployed"):
        registry.load("math_qa")
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.load("math_qa@9")
    with pytest.raises(NotFoundError, match="no version 4"):
        registry.deploy("math_qa", 4)
    with pytest.raises(RegistryError, match="nothing of 'math_qa' is deployed"):
        registry.rollback("math_qa")


def test_a_changed_signature_is_reported_on_load(database_url: str) -> None:
    record = _record()
    drifted = ProgramRecord.model_validate(
        {
            **record.model_dump(),
            "metadata": {
                **record.metadata.model_dump(),
                "program_ref": "tests.storage.programs:build_renamed",
            },
        }
    )
    registry.register("math_qa", drifted, deploy=True)
    with pytest.raises(StorageError, match=r"cannot load math_qa@1: .*no longer match"):
        registry.load("math_qa")


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "a/b", "", "x" * 129, "bad\nname", "name\n", ".hidden", "a b", "nul\x00", "é"]
)
def test_invalid_names_are_rejected(database_url: str, name: str) -> None:
    with pytest.raises(RegistryError, match="invalid program name"):
        registry.register(name, _record())
    assert registry.list_names() == []


def test_diff_shows_instructions_and_demos(database_url: str) -> None:
    registry.register("math_qa", _record(60.0, instruction="Old instruction.", n_demos=1))
    registry.register("math_qa", _record(80.0, instruction="New instruction.", n_demos=3))
    result = registry.diff("math_qa@1", "math_qa@2")
    entry = result["predictors"]["predict"]
    assert result["changed"] and result["best_score"] == {"a": 60.0, "b": 80.0}
    assert (
        entry["instructions"]["a"] == "Old instruction." and entry["instructions"]["b"] == "New instruction."
    )
    assert "+New instruction." in entry["instructions"]["diff"]
    assert (entry["demos"]["a"], entry["demos"]["b"], len(entry["demos"]["added"])) == (1, 3, 2)
    assert registry.diff("math_qa@2", "math_qa@2")["changed"] is False


def test_events_are_emitted_once_each(database_url: str) -> None:
    seen: list[Event] = []
    sub = bus.subscribe("dspy.*", seen.append)
    try:
        registry.register("math_qa", _record(), deploy=True)
        registry.register("math_qa", _record(), deploy=True)
        registry.rollback("math_qa")
    finally:
        bus.remove(sub)
    names = [e.name for e in seen if not e.name.startswith("dspy.storage")]
    assert names == [
        "dspy.signature.optimized",
        "dspy.registry.register",
        "dspy.signature.deployed",
        "dspy.signature.optimized",
        "dspy.registry.register",
        "dspy.signature.deployed",
        "dspy.registry.rollback",
        "dspy.signature.deployed",
    ]
    assert seen[0].job_id == "job-7" and seen[0].data["version"] == 1
    assert seen[-1].data == {
        "name": "math_qa",
        "version": 1,
        "previous_version": 2,
        "action": "rollback",
        "actor": seen[-1].data["actor"],
    }


@pytest.mark.integration
def test_load_in_a_fresh_process_gives_the_same_predictions(database_url: str) -> None:
    original = optimized()
    registry.register("math_qa", ProgramRecord.from_program(original, program_ref=REF), deploy=True)
    registry.register("math_qa", _record(instruction="Answer quickly."))  # not deployed
    script = textwrap.dedent(
        """
        import json
        import dmipro.registry
        from tests.storage.programs import predictions
        load = dmipro.registry.load
        print(json.dumps([predictions(load("math_qa")), predictions(load("math_qa@2"))]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    deployed, second = json.loads(out.stdout.strip().splitlines()[-1])
    assert deployed == predictions(original)
    assert second == predictions(optimized("Answer quickly."))
    assert deployed != second


RACE = """
import sys, time
from pathlib import Path
from dmipro.registry import Registry
from dmipro.storage import DatabaseProgramStore, ProgramRecord

index, gate, source = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
record = ProgramRecord.from_bytes(source.read_bytes())
meta = record.metadata.model_copy(update={"best_score": float(index)})
record = record.model_copy(update={"metadata": meta})
reg = Registry()
reg.list_names()  # open the database (and check its schema) before the start signal
(gate.parent / f"ready-{index}").touch()
while not gate.exists():
    time.sleep(0.001)
start = time.time()
info = reg.register("math_qa", record, deploy=True, actor=f"worker-{index}")
print(info.version, info.program_id, time.time() - start)
"""


@pytest.mark.integration
@pytest.mark.slow
def test_concurrent_registrations_from_processes_get_distinct_versions(
    database_url: str, tmp_path: Path
) -> None:
    Registry().list_names()  # create the schema before the race, as a deployment would
    gate = tmp_path / "go"
    source = tmp_path / "record.json"
    source.write_bytes(_record().to_bytes())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(i), str(gate), str(source)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("ready-*"))) < 8 and time.time() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.01)
        gate.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    versions = sorted(int(out.split()[0]) for out, _ in results)
    assert versions == list(range(1, 9))
    stored = Registry().versions("math_qa")
    assert [v.version for v in stored] == list(range(1, 9))
    assert len({v.program_id for v in stored}) == 8
    # Every deployment moved from the version deployed just before it: none was lost.
    history = Registry().history("math_qa")
    assert len(history) == 8
    assert [h.from_version for h in history[1:]] == [h.to_version for h in history[:-1]]
    assert Registry().show("math_qa").version == history[-1].to_version
