"""The grounded proposer: dataset summary, program and module descriptions, instruction proposals."""

from __future__ import annotations

from dmipro.propose.proposer import GroundedProposer
from dmipro.tasks.grounded import (
    MAX_DATA_BATCHES,
    TIPS,
    choose_tip,
    data_batches,
    module_string,
    program_code,
    render_examples,
    task_demos_for,
)

__all__ = [
    "GroundedProposer",
    "MAX_DATA_BATCHES",
    "TIPS",
    "choose_tip",
    "data_batches",
    "module_string",
    "program_code",
    "render_examples",
    "task_demos_for",
]
