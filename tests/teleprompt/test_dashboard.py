"""What optuna-dashboard shows of a job: read back with plain optuna from the job database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import optuna
import pytest

import dmipro
from dmipro.errors import StorageError
from dmipro.jobs import JobStore
from dmipro.teleprompt.search import SearchSpace, Study, full_study_name
from tests.teleprompt.conftest import small_spec

# Every study is read back as written, on SQLite and on PostgreSQL.
pytestmark = pytest.mark.usefixtures("database_url")


def _storage_url() -> str:
    return JobStore().engine.url.render_as_string(hide_password=False)


def _load(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage_url())


@pytest.mark.parametrize("parallel_trials", [1, None])
def test_the_dashboards_best_trial_is_the_program_dmipro_chose(parallel_trials: int | None) -> None:
    # Minibatch search with full evaluations every 3 trials: the main study's best is a
    # minibatch score on 10 examples, the companion's best is the full-valset winner.
    result = dmipro.optimize(
        small_spec(num_trials=9, minibatch_full_eval_steps=3, parallel_trials=parallel_trials)
    )
    record = JobStore().get(result.job_id)
    assert record.result is not None

    full = _load(full_study_name(f"dmipro:{result.job_id}"))
    assert full.best_trial.value == result.best_score == record.result["best_score"]
    # The companion holds exactly the baseline and the full-valset evaluations, readable.
    logged = sorted(e["score"] for e in result.trial_logs.values() if e["full_eval"])
    assert sorted(t.value for t in full.trials) == logged
    assert {t.user_attrs["kind"] for t in full.trials} == {"baseline", "full"}
    chosen = result.best_candidate["predict"]["instruction"]
    best_text = full.best_trial.user_attrs["predict.instruction"]
    assert best_text.split(": ", 1)[1].rstrip("…") in chosen

    main = _load(f"dmipro:{result.job_id}")
    for study in (main, full):
        attrs = study.user_attrs
        assert attrs["job"] == result.job_id
        assert attrs["program"] == "examples.math_qa.program:build"
        assert attrs["settings"]["num_trials"] == 9 and attrs["lm"] == "sim/math"
    done = [t for t in main.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len(result.trial_logs)
    kinds = [t.user_attrs["kind"] for t in done]
    assert kinds.count("minibatch") == 9 and kinds.count("baseline") == 1
    for t in done:
        text = t.user_attrs["predict.instruction"]
        assert text.startswith(f"#{t.params['0_predictor_instruction']}: ")
        assert len(text.split(": ", 1)[1]) <= 200
        assert t.user_attrs["predict.demos"].startswith(f"set {t.params['0_predictor_demos']}: ")
    # Why the companion exists: the main study's best is not what dmipro returned here.
    best_main = main.best_trial
    assert best_main.value >= result.best_score


def test_a_crash_between_the_two_writes_is_repaired_on_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    space = SearchSpace(
        predictors=("predict",),
        instructions={"predict": ["Answer.", "x" * 300]},
        demo_sets={"predict": [[], [{"question": "q", "answer": "1", "augmented": True}, {"question": "r"}]]},
    )
    url = _storage_url()
    study = Study("dmipro:crash", url, seed=0, space=space, attrs={"job": "crash"})
    baseline = study.ask("baseline", 0, space.baseline_params())
    study.tell(baseline.number, 50.0)

    def crash(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt("killed between the main study's write and the companion's")

    monkeypatch.setattr(Study, "_copy_full", crash)
    with pytest.raises(KeyboardInterrupt):
        study.add_full({"0_predictor_instruction": 1, "0_predictor_demos": 1}, 80.0, 1)
    monkeypatch.undo()
    assert [t.value for t in _load("dmipro:crash:full").trials] == [50.0]

    resumed = Study("dmipro:crash", url, seed=0, space=space, attrs={"job": "ignored on resume"})
    st = resumed.state()
    assert st.best_score == 80.0
    full = _load("dmipro:crash:full")
    assert [t.value for t in full.trials] == [50.0, 80.0] and full.best_trial.value == 80.0
    repaired = full.best_trial.user_attrs
    assert repaired["search_trial"] == 1 and repaired["kind"] == "full"
    assert repaired["predict.instruction"] == "#1: " + "x" * 199 + "…"
    assert repaired["predict.demos"] == "set 1: 2 demos (1 bootstrapped, 1 labeled)"
    assert resumed.study.user_attrs["job"] == "crash"
    resumed.state()
    assert len(_load("dmipro:crash:full").trials) == 2  # the repair runs once, adds nothing twice


def test_a_trial_killed_while_being_asked_is_failed_not_rerun() -> None:
    space = SearchSpace(
        predictors=("predict",), instructions={"predict": ["Answer.", "Think."]}, demo_sets=None
    )
    study = Study("dmipro:half-asked", _storage_url(), seed=0, space=space)
    asked = study.ask("minibatch", 0)
    # What a kill between optuna's "create the trial" and "write its params" leaves behind
    # (dmipro writes a trial whole, but the study may have been written by optuna's own ask).
    study.study._storage.create_new_trial(study.study._study_id)
    resumed = Study("dmipro:half-asked", _storage_url(), seed=0, space=space)
    st = resumed.state()
    assert [t.number for t in st.running] == [asked.number]
    states = [t.state for t in _load("dmipro:half-asked").trials]
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]
    assert resumed.ask("minibatch", 1).number == 2


def test_every_trial_is_stored_as_the_search_sees_it_and_a_second_writer_is_refused() -> None:
    space = SearchSpace(
        predictors=("predict",), instructions={"predict": ["Answer.", "Think.", "Plan."]}, demo_sets=None
    )
    study = Study("dmipro:write-through", _storage_url(), seed=3, space=space)
    baseline = study.ask("baseline", 0, space.baseline_params())
    asked = [study.ask("minibatch", 0) for _ in range(3)]
    study.tell(baseline.number, 40.0)
    for i, t in enumerate(asked[:2]):
        study.tell(t.number, 50.0 + i)
    study.add_full({"0_predictor_instruction": 2}, 70.0, 1)

    stored = _load("dmipro:write-through").trials
    seen = study.trials()
    assert [(t.number, t.state, t.value, t.params) for t in stored] == [
        (t.number, t.state, t.value, t.params) for t in seen
    ]
    kinds = [t.user_attrs["kind"] for t in stored]
    assert kinds == ["baseline", "minibatch", "minibatch", "minibatch", "full"]
    assert all(t.user_attrs["predict.instruction"].startswith("#") for t in stored)
    # A resumed study sees the same trials, the one in flight still running.
    resumed = Study("dmipro:write-through", _storage_url(), seed=3, space=space)
    st = resumed.state()
    assert [t.number for t in st.running] == [asked[2].number]
    assert (st.best_score, st.completed) == (70.0, 4)

    # Only one coordinator writes a study (the job's lease); a second writer is caught, not merged.
    resumed.tell(asked[2].number, 60.0)
    with pytest.raises(StorageError, match="finished by another process"):
        study.tell(asked[2].number, 61.0)
    resumed.ask("minibatch", 2)
    with pytest.raises(StorageError, match="written by another process"):
        study.ask("minibatch", 2)


@pytest.fixture
def far_east(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_east")
def test_trial_times_are_stored_as_optuna_stores_them() -> None:
    # Stored as optuna's own storage stores them (naive UTC, read back as local time): with
    # .timestamp(), as the job report reads them, a trial that ran just now ran just now.
    space = SearchSpace(
        predictors=("predict",), instructions={"predict": ["Answer.", "Think."]}, demo_sets=None
    )
    study = Study("dmipro:times", _storage_url(), seed=0, space=space)
    baseline = study.ask("baseline", 0, space.baseline_params())
    study.tell(baseline.number, 40.0)
    study.add_full({"0_predictor_instruction": 1}, 50.0, 1)
    now = time.time()
    for t in _load("dmipro:times").trials:
        assert t.datetime_start is not None and t.datetime_complete is not None
        assert abs(t.datetime_start.timestamp() - now) < 60
        assert abs(t.datetime_complete.timestamp() - now) < 60
