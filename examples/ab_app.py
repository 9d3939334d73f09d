"""An app that serves math_qa through an A/B experiment to simulated users, on the simulated LM.

    python examples/ab_app.py                 # register both versions, serve users, print the decision
    python examples/ab_app.py --promote --json  # and deploy the winner; one JSON document on stdout

Without ``--control``/``--treatment`` it registers math_qa as written (the control) and
the version MIPROv2 makes of it on the demo job (the treatment), so it runs from a fresh
``DMIPRO_HOME``. Each simulated user asks one question of the test split; the app serves
the arm's program, scores the answer by exact match and records the outcome. It looks at
the anytime-valid analysis every ``--look-every`` users and stops as soon as it has a
decision (looking that often is safe: see ``dmipro.ab.stats``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import dspy

import dmipro
from dmipro.jobs.spec import LMConfig
from dmipro.lm import build_lm
from dmipro.refs import ensure_importable

HERE = Path(__file__).resolve().parent
JOB = HERE / "math_qa" / "job.yaml"


def register_versions() -> tuple[str, str]:
    """math_qa as written and as optimized, registered now; returns their ``NAME@V`` specs."""
    import dmipro.registry as registry
    from dmipro.storage import ProgramRecord
    from examples.math_qa.program import build

    control = registry.register("math_qa", ProgramRecord.from_program(build(), program_ref=build))
    result = dmipro.optimize(JOB)  # the job registers its result as the next version of math_qa
    assert result.registered is not None
    return control.spec, f"math_qa@{result.registered['version']}"


def serve(exp: dmipro.ab.Experiment, users: int, look_every: int, seed: int) -> dict[str, Any]:
    """Simulated traffic: each user asks a test question, gets the arm's answer, is scored, recorded."""
    from examples.math_qa.program import exact_match

    lines = (HERE / "math_qa" / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line) for line in lines]
    rng = random.Random(seed)
    lm = build_lm(LMConfig(model="sim/math", temperature=0.0))
    result: dict[str, Any] = {}
    with dspy.context(lm=lm):
        for user in range(1, users + 1):
            unit = f"user-{seed}-{user}"
            arm = exp.assign(unit)
            row = rng.choice(questions)
            start = time.perf_counter()
            try:
                prediction = arm.program(question=row["question"])
                score, error = exact_match(dspy.Example(**row), prediction), False
            except Exception:  # a failed call is an outcome too: wrong, and counted as an error
                score, error = 0.0, True
            exp.record(unit, score, latency_ms=1000 * (time.perf_counter() - start), error=error)
            if user % look_every == 0:
                result = exp.analyze()
                if result["decision"] != "continue":
                    break
    return result or exp.analyze()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", help="NAME@V (default: register math_qa as written)")
    parser.add_argument("--treatment", help="NAME@V (default: register MIPROv2's version)")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--look-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--promote", action="store_true", help="deploy the winner")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    ensure_importable([HERE.parent])  # `python examples/ab_app.py` from the repository works too

    # DSPy and the optimizer may print; with --json stdout carries only the result.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        if args.control and args.treatment:
            control, treatment = args.control, args.treatment
        else:
            control, treatment = register_versions()
        # The simulated LM answers in process: its "latency" is this machine's CPU time, which the
        # optimized version's longer prompts (its demos) raise, more so on a busy machine. The example
        # keeps the cost and error-rate guardrails and leaves latency to real providers.
        exp = dmipro.ab.create(f"math_qa-ab-{int(time.time())}-{args.seed}", control=control,
                               treatment=treatment, mde=0.05,
                               guardrails={"cost_usd": 0.25, "error_rate": 0.02})
        result = serve(exp, args.users, args.look_every, args.seed)
        if args.promote and result["decision"] in ("treatment", "control"):
            result["promoted"] = exp.promote()
        exp.close()
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        c, t = result["control"], result["treatment"]
        print(f"{exp.name}: control {control} {c['mean']:.3f} (n={c['n']}), "
              f"treatment {treatment} {t['mean']:.3f} (n={t['n']})")
        print(f"lift {result['lift']:+.3f} [{result['lift_ci_low']:+.3f}, {result['lift_ci_high']:+.3f}], "
              f"p={result['p_value']:.2g}, after {result['units']} users")
        print(f"decision: {result['decision']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
