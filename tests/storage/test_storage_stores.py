"""The ProgramStore contract, on the database (SQLite, PostgreSQL) and directory backends."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dmipro.config import reload_settings
from dmipro.errors import DecodeError, StorageError
from dmipro.events import Event, bus
from dmipro.storage import (
    DatabaseProgramStore,
    DirectoryProgramStore,
    ProgramRecord,
    ProgramStore,
    build_program,
    get_store,
    read_program_file,
)
from tests.storage.programs import optimized, predictions

REF = "examples.math_qa.program:build"


def _record(score: float = 80.0, job_id: str | None = "job-1") -> ProgramRecord:
    return ProgramRecord.from_program(
        optimized(), program_ref=REF, job_id=job_id, best_score=score, history=[{"trial": 0, "score": score}]
    )


def test_save_then_load_gives_the_same_record_and_program(store: ProgramStore) -> None:
    record = _record()
    program_id = store.save(record)
    loaded = store.load(program_id)
    assert loaded == record
    assert predictions(build_program(loaded)) == predictions(optimized())


def test_list_is_newest_first_and_filters_by_job(store: ProgramStore) -> None:
    first = store.save(_record(1.0, "job-a"))
    time.sleep(0.01)
    second = store.save(_record(2.0, "job-b"))
    listed = store.list()
    assert [p.id for p in listed] == [second, first]
    assert [p.best_score for p in listed] == [2.0, 1.0]
    assert [p.id for p in store.list(job_id="job-a")] == [first]
    assert store.list(job_id="nope") == []


@pytest.mark.parametrize("bad_id", ["0" * 32, "../../etc/passwd", "", "A" * 32])
def test_loading_an_unknown_or_malformed_id_is_a_storage_error(store: ProgramStore, bad_id: str) -> None:
    with pytest.raises(StorageError):
        store.load(bad_id)


def test_each_call_emits_one_event(store: ProgramStore) -> None:
    seen: list[Event] = []
    sub = bus.subscribe("dspy.storage.*", seen.append)
    try:
        program_id = store.save(_record())
        store.load(program_id)
        with pytest.raises(StorageError):
            store.load("f" * 32)
    finally:
        bus.remove(sub)
    assert [e.name for e in seen] == ["dspy.storage.save", "dspy.storage.load", "dspy.storage.error"]
    assert seen[0].job_id == "job-1" and seen[0].data["program_id"] == program_id


def test_concurrent_saves_from_threads_all_land(store: ProgramStore) -> None:
    record = _record()
    ids: list[str] = []
    errors: list[BaseException] = []

    def save() -> None:
        try:
            ids.append(store.save(record))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(ids)) == 8
    assert {p.id for p in store.list()} == set(ids)


def test_directory_files_are_complete_export_documents(tmp_path: Path) -> None:
    store = DirectoryProgramStore(tmp_path / "d")
    program_id = store.save(_record())
    files = sorted(p.name for p in (tmp_path / "d" / "programs").iterdir())
    assert files == [f"{program_id}.json"]  # no temporary files left behind
    assert read_program_file(tmp_path / "d" / "programs" / files[0]) == store.load(program_id)


def test_a_tampered_file_is_reported_not_loaded(tmp_path: Path) -> None:
    store = DirectoryProgramStore(tmp_path / "d")
    program_id = store.save(_record())
    (tmp_path / "d" / "programs" / f"{program_id}.json").write_text('{"format": "dmipro.program/v1"}')
    with pytest.raises(DecodeError, match="metadata"):
        store.load(program_id)


def test_get_store_follows_the_storage_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(get_store(), DatabaseProgramStore)
    monkeypatch.setenv("DMIPRO_STORAGE", str(tmp_path / "files"))
    reload_settings()
    store = get_store()
    assert isinstance(store, DirectoryProgramStore) and store.root == tmp_path / "files"
