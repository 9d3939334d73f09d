"""Phase 2 orchestration: the grounded proposer's calls, fanned out over an executor."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dmipro.errors import TaskError, TransientLMError
from dmipro.events import bus
from dmipro.executor_adapters.base import ExecutorAdapter
from dmipro.jobs.runtime import JobRuntime
from dmipro.lm.faults import FaultCounts
from dmipro.lm.usage import Usage
from dmipro.seeding import rng_for
from dmipro.tasks import propose as _propose_body  # noqa: F401  (registers the proposal tasks, shipped here)
from dmipro.tasks.grounded import choose_tip, data_batches, module_string, program_code, task_demos_for

if TYPE_CHECKING:  # the teleprompt package imports this module
    from dmipro.teleprompt.result import PhaseStats

__all__ = ["GroundedProposer"]

log = logging.getLogger(__name__)


class GroundedProposer:
    """DSPy's grounded proposer as three waves of tasks.

    Wave 1 observes data batches and describes the program; wave 2 summarizes the
    observations and describes each module; wave 3 runs every instruction proposal at
    once, each with its own tip and seed. A failed description or summary degrades the
    proposer the way DSPy's does (it proposes without that context).
    """

    def __init__(
        self,
        job_id: str,
        runtime: JobRuntime,
        executor: ExecutorAdapter,
        *,
        predictors: list[str],
        num_instructions: int,
    ) -> None:
        self.job_id = job_id
        self.runtime = runtime
        self.executor = executor
        self.predictors = predictors
        self.num_instructions = num_instructions
        self.opt = runtime.spec.optimizer
        self.seed = self.opt.seed

    def propose(self, stats: PhaseStats, demo_sets: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
        """Propose ``num_instructions`` candidates per predictor (index 0: the original instruction)."""
        program = self.runtime.fresh_program()
        preds = dict(program.named_predictors())
        opt, job = self.opt, self.job_id
        n_sets = len(demo_sets[self.predictors[0]])
        per_predictor = min(self.num_instructions, n_sets)
        code = program_code(program) if opt.program_aware_proposer else None
        first = preds[self.predictors[0]]
        example = (
            task_demos_for(first, demo_sets[self.predictors[0]], min(2, n_sets - 1))
            if n_sets > 1
            else "No task demos provided."
        )

        # Wave 1: observations on data batches, and the program description.
        wave1: list[tuple[str, dict[str, Any]]] = []
        if opt.data_aware_proposer:
            for lo, hi in data_batches(len(self.runtime.split("train")), opt.view_data_batch_size):
                wave1.append(("describe_data", {"job": job, "start": lo, "stop": hi}))
        if code is not None:
            wave1.append(
                (
                    "describe_program",
                    {
                        "job": job,
                        "program_code": code,
                        "program_example": example,
                        "seed": rng_for(self.seed, "describe_program").randrange(10**9),
                        "temperature": opt.init_temperature,
                    },
                )
            )
        out1 = self._run_mixed(wave1, stats)
        observations = "".join(
            r["observations"]
            for (t, _), r in zip(wave1, out1, strict=True)
            if t == "describe_data" and r and not r["observations"][:8].upper() == "COMPLETE"
        )
        program_description = next(
            (
                r["program_description"]
                for (t, _), r in zip(wave1, out1, strict=True)
                if t == "describe_program" and r
            ),
            None,
        )

        # Wave 2: the dataset summary, and each module's description.
        wave2: list[tuple[str, dict[str, Any]]] = []
        if opt.data_aware_proposer and observations:
            wave2.append(("summarize_data", {"job": job, "observations": observations}))
        if code is not None and program_description is not None:
            for i, name in enumerate(self.predictors):
                wave2.append(
                    (
                        "describe_module",
                        {
                            "job": job,
                            "program_code": code,
                            "program_example": example,
                            "program_description": program_description,
                            "module": module_string(preds[name]),
                            "seed": rng_for(self.seed, "describe_module", i).randrange(10**9),
                            "temperature": opt.init_temperature,
                            "name": name,
                        },
                    )
                )
        out2 = self._run_mixed(wave2, stats)
        summary = next(
            (r["summary"] for (t, _), r in zip(wave2, out2, strict=True) if t == "summarize_data" and r), None
        )
        module_desc = {
            p["name"]: r["module_description"]
            for (t, p), r in zip(wave2, out2, strict=True)
            if t == "describe_module" and r
        }
        program_aware = (
            code is not None and program_description is not None and len(module_desc) == len(preds)
        )

        # Wave 3: every instruction proposal at once; candidate 0 is the original instruction.
        instructions = {name: [preds[name].signature.instructions] for name in self.predictors}
        payloads = []
        for i, name in enumerate(self.predictors):
            for set_i in range(1, per_predictor):
                ctx: dict[str, Any] = {
                    "task_demos": task_demos_for(preds[name], demo_sets[name], set_i)
                    if opt.fewshot_aware_proposer
                    else "No task demos provided.",
                    "basic_instruction": preds[name].signature.instructions,
                }
                if summary is not None:
                    ctx["dataset_description"] = summary
                if program_aware:
                    ctx.update(
                        program_code=code,
                        program_description=program_description,
                        module=module_string(preds[name]),
                        module_description=module_desc[name],
                    )
                tip = choose_tip(self.seed, i, set_i) if opt.tip_aware_proposer else ""
                if tip:
                    ctx["tip"] = tip
                payloads.append(
                    {
                        "job": job,
                        "predictor": name,
                        "index": set_i,
                        "context": ctx,
                        "seed": rng_for(self.seed, "proposal", i, set_i).randrange(10**9),
                        "temperature": opt.init_temperature,
                    }
                )
        results = self.executor.gather("propose_instruction", payloads, stats.prompt_lm, stats.faults)
        stats.depth = sum(1 for wave in (wave1, wave2, payloads) if wave)
        for res in sorted(results, key=lambda r: (self.predictors.index(r["predictor"]), r["index"])):
            instructions[res["predictor"]].append(res["instruction"])
        bus.emit(
            "dspy.optimization.instruction_proposal_complete",
            num_instructions={k: len(v) for k, v in instructions.items()},
            dataset_summary=summary is not None,
            program_aware=program_aware,
        )
        return {
            "instructions": instructions,
            "dataset_summary": summary,
            "program_description": program_description,
        }

    def _run_mixed(self, work: list[tuple[str, dict[str, Any]]], stats: PhaseStats) -> list[dict[str, Any]]:
        """Run a wave of different proposer tasks at once; a failed one gives ``{}`` (DSPy degrades too)."""
        futures = [self.executor.submit(task, payload) for task, payload in work]
        out: list[dict[str, Any]] = []
        for (task, _), fut in zip(work, futures, strict=True):
            try:
                res = fut.result()
            except (TaskError, TransientLMError) as exc:
                log.warning("%s failed, proposing without it: %s", task, exc)
                if isinstance(exc, TransientLMError):  # counted: a failure nobody sees is worse
                    stats.faults.record_gave_up(exc)
                out.append({})
                continue
            stats.prompt_lm.add(Usage.from_json(res.get("usage")))
            stats.faults.add(FaultCounts.from_json(res.get("faults")))
            out.append(res)
        return out
