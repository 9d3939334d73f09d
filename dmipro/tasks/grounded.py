"""The grounded proposer's context: data batches, program code, task demos and tips.

Signatures and helpers are DSPy's own (``dspy.propose``), so prompts match what
``dspy.MIPROv2`` sends. What changes is the shape of the work: observations are a map
over data batches followed by one summary, the program description is computed once
and each module's description once per predictor, and every instruction proposal is an
independent task with its own seed.
"""

from __future__ import annotations

from typing import Any

from dmipro.seeding import rng_for

__all__ = [
    "MAX_DATA_BATCHES",
    "TIPS",
    "choose_tip",
    "data_batches",
    "module_string",
    "program_code",
    "render_examples",
    "task_demos_for",
]

MAX_DATA_BATCHES = 10
"""DSPy's dataset summary looks at no more than 10 batches of the trainset."""


def _tips() -> dict[str, str]:
    from dspy.propose.grounded_proposer import TIPS as DSPY_TIPS

    return dict(DSPY_TIPS)


TIPS = _tips()


def data_batches(n_train: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the trainset batches the dataset summary observes."""
    starts = list(range(0, n_train, batch_size))[:MAX_DATA_BATCHES]
    return [(s, min(n_train, s + batch_size)) for s in starts]


def render_examples(examples: list[Any]) -> str:
    """The examples as DSPy's dataset describer shows them (input keys sorted)."""
    from dspy.propose.dataset_summary_generator import order_input_keys_in_string

    return str(order_input_keys_in_string(repr(examples)))


def program_code(program: Any) -> str | None:
    """DSPy's source rendering of the program; None when it cannot be read."""
    from dspy.propose.utils import get_dspy_source_code

    try:
        return str(get_dspy_source_code(program))
    except Exception:
        return None


def module_string(predictor: Any) -> str:
    """``Predict(in1, in2) -> out1, out2``, as DSPy describes a module."""
    sig = predictor.signature
    return f"{predictor.__class__.__name__}({', '.join(sig.input_fields)}) -> {', '.join(sig.output_fields)}"


def task_demos_for(predictor: Any, sets: list[list[dict[str, Any]]], set_index: int, k: int = 3) -> str:
    """Up to ``k`` bootstrapped demos from set ``set_index`` onwards, wrapping around.

    Set 0 (zero-shot) or no bootstrapped demos at all gives "No task demos provided.".
    """
    import dspy
    from dspy.propose.utils import create_example_string

    if set_index == 0 or not sets:
        return "No task demos provided."
    ordered = [sets[set_index], *sets[set_index + 1 :], *sets[:set_index]]
    rendered = []
    for demo_set in ordered:
        for demo in demo_set:
            if "augmented" in demo:
                rendered.append(create_example_string(predictor.signature.fields, dspy.Example(**demo)))
                if len(rendered) >= k:
                    break
        if len(rendered) >= k:
            break
    text = "\n\n".join(rendered)
    return text + "\n\n" if text.strip() else "No task demos provided."


def choose_tip(seed: int, predictor_index: int, set_index: int) -> str:
    """A tip drawn at random (seeded per proposal), as DSPy's ``set_tip_randomly``."""
    key = rng_for(seed, "tip", predictor_index, set_index).choice(sorted(TIPS))
    return TIPS[key]
