"""Trials written to the job database by dmipro's study: numbered as optuna numbers them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import optuna

from dmipro.teleprompt.search import SearchSpace, Study


def test_two_writers_at_once_give_every_trial_its_own_number(postgres_url: str) -> None:
    # Two studies on one name, as two processes would open it: the row lock orders the numbers.
    space = SearchSpace(predictors=("predict",), instructions={"predict": ["A.", "B."]}, demo_sets=None)
    writers = [Study("dmipro:two-writers", postgres_url, seed=0, space=space) for _ in range(2)]
    trial = optuna.trial.create_trial(
        params={"0_predictor_instruction": 1}, distributions=space.distributions(), value=0.5
    )
    study_id = writers[0].study._study_id
    try:
        with ThreadPoolExecutor(4) as pool:
            numbers = list(pool.map(lambda i: writers[i % 2]._rows.add(study_id, trial)[1], range(40)))
    finally:
        for w in writers:
            w.close()
    assert sorted(numbers) == list(range(40))
    stored = optuna.load_study(study_name="dmipro:two-writers", storage=postgres_url).trials
    assert [t.number for t in stored] == list(range(40))
    assert {(t.value, t.params["0_predictor_instruction"]) for t in stored} == {(0.5, 1)}
