"""Grounded-proposer tasks: observe data, summarize, describe program and modules, propose.

Each runs one prompt-LM call with DSPy's own signature for that step.
"""

from __future__ import annotations

from typing import Any

from dmipro.events import correlate
from dmipro.executor_adapters.task_table import task
from dmipro.jobs.runtime import JobRuntime, get_runtime
from dmipro.lm.usage import metered
from dmipro.tasks.grounded import render_examples

__all__ = ["describe_data", "describe_module", "describe_program", "propose_instruction", "summarize_data"]


def _predict(
    runtime: JobRuntime, signature: Any, seed: int | None, temperature: float, **inputs: Any
) -> tuple[Any, dict[str, Any]]:
    import dspy

    overrides: dict[str, Any] = {"temperature": temperature}
    if seed is not None:
        overrides["rollout_id"] = seed
    lm = runtime.prompt_lm.copy(**overrides)
    with correlate(job_id=runtime.job_id), metered() as meter, runtime.context(lm=lm):
        prediction = dspy.Predict(signature)(**inputs)
    return prediction, {"usage": meter.usage.to_json(), "faults": meter.faults.to_json()}


@task("describe_data")
def describe_data(payload: dict[str, Any]) -> dict[str, Any]:
    """Observations on one batch of the trainset: ``job``, ``start``, ``stop``."""
    from dspy.propose.dataset_summary_generator import DatasetDescriptor

    runtime = get_runtime(payload["job"])
    batch = runtime.split("train")[payload["start"] : payload["stop"]]
    pred, meta = _predict(runtime, DatasetDescriptor, None, 1.0, examples=render_examples(batch))
    return {"observations": str(pred.observations), **meta}


@task("summarize_data")
def summarize_data(payload: dict[str, Any]) -> dict[str, Any]:
    """One summary of all batches' ``observations``."""
    from dspy.propose.dataset_summary_generator import ObservationSummarizer
    from dspy.propose.utils import strip_prefix

    runtime = get_runtime(payload["job"])
    pred, meta = _predict(runtime, ObservationSummarizer, None, 1.0, observations=payload["observations"])
    return {"summary": str(strip_prefix(pred.summary)), **meta}


@task("describe_program")
def describe_program(payload: dict[str, Any]) -> dict[str, Any]:
    """What the program does: ``program_code``, ``program_example``."""
    from dspy.propose.grounded_proposer import DescribeProgram
    from dspy.propose.utils import strip_prefix

    runtime = get_runtime(payload["job"])
    pred, meta = _predict(
        runtime,
        DescribeProgram,
        payload.get("seed"),
        payload.get("temperature", 1.0),
        program_code=payload["program_code"],
        program_example=payload["program_example"],
    )
    return {"program_description": str(strip_prefix(pred.program_description)), **meta}


@task("describe_module")
def describe_module(payload: dict[str, Any]) -> dict[str, Any]:
    """One module's role in the program."""
    from dspy.propose.grounded_proposer import DescribeModule

    runtime = get_runtime(payload["job"])
    pred, meta = _predict(
        runtime,
        DescribeModule,
        payload.get("seed"),
        payload.get("temperature", 1.0),
        program_code=payload["program_code"],
        program_example=payload["program_example"],
        program_description=payload["program_description"],
        module=payload["module"],
    )
    return {"module_description": str(pred.module_description), **meta}


@task("propose_instruction")
def propose_instruction(payload: dict[str, Any]) -> dict[str, Any]:
    """One instruction proposal for one predictor; ``context`` holds the proposer's inputs.

    The signature is DSPy's ``GenerateSingleModuleInstruction``, with the fields the
    job's proposer flags turn on (data-, program- and tip-aware).
    """
    from dspy.propose.grounded_proposer import generate_instruction_class
    from dspy.propose.utils import strip_prefix

    runtime = get_runtime(payload["job"])
    ctx = payload["context"]
    predictor = generate_instruction_class(
        use_dataset_summary="dataset_description" in ctx,
        program_aware="program_code" in ctx,
        use_task_demos=True,
        use_instruct_history=False,
        use_tip="tip" in ctx,
    )
    pred, meta = _predict(
        runtime, predictor.signature, payload["seed"], payload.get("temperature", 1.0), **ctx
    )
    return {
        "predictor": payload["predictor"],
        "index": payload["index"],
        "instruction": str(strip_prefix(pred.proposed_instruction)),
        **meta,
    }
