"""The word-problem generator and its solver agree, level by level."""

from __future__ import annotations

import pytest

from dmipro.lm._math import Problem, difficulty, generate_problems, parse, solve, steps


def test_solver_round_trips_generated_problems() -> None:
    problems = generate_problems(900, seed=11)
    assert len({p["question"] for p in problems}) == 900
    for record in problems:
        question = record["question"]
        assert solve(question) == int(record["answer"]), question
        assert difficulty(question) == record["level"]


def test_levels_are_mixed_and_mean_what_they_say() -> None:
    problems = generate_problems(300, seed=3)
    levels = [p["level"] for p in problems]
    assert {levels.count(level) for level in (1, 2, 3)} == {100}
    for record in problems:
        problem = parse(record["question"])
        assert problem is not None
        names = [op for op, _ in problem.ops]
        assert len(names) == record["level"]
        if record["level"] == 3:
            assert {"mul", "div"} & set(names)
        else:
            assert set(names) <= {"add", "sub"}


def test_every_intermediate_value_is_a_positive_integer() -> None:
    for record in generate_problems(600, seed=5):
        problem = parse(record["question"])
        assert problem is not None
        value = problem.start
        for op, n in problem.ops:
            if op == "div":
                assert value % n == 0
            value = Problem(value, ((op, n),), problem.unit).answer
            assert value > 0


def test_generation_is_seeded() -> None:
    assert generate_problems(50, seed=1) == generate_problems(50, seed=1)
    assert generate_problems(50, seed=1) != generate_problems(50, seed=2)


def test_generate_only_requested_levels() -> None:
    assert {p["level"] for p in generate_problems(40, seed=0, levels=(2,))} == {2}


@pytest.mark.parametrize(
    "question",
    ["What is the capital of France?", "What is 2 + 2?", "", "Ava has 3 apples. How many apples?",
     "Ava has 3 apples. She sings 2 songs. How many apples does Ava have now?"],
)
def test_solve_refuses_what_it_cannot_parse(question: str) -> None:
    assert solve(question) is None


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate_problems(-1, seed=0)
    with pytest.raises(ValueError):
        generate_problems(3, seed=0, levels=(4,))


def test_steps_end_at_the_answer_and_can_carry_a_slip() -> None:
    record = generate_problems(1, seed=9, levels=(2,))[0]
    question, answer = record["question"], record["answer"]
    lines = steps(question)
    assert lines is not None and lines[-1].endswith(f"= {answer}.")
    slipped = steps(question, final=int(answer) + 1)
    assert slipped is not None and slipped[-1].endswith(f"= {int(answer) + 1}.")
    assert steps("not a problem") is None
