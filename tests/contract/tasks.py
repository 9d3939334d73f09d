"""Task bodies the contract suite registers in the test process and in every test worker."""

from __future__ import annotations

import os
from typing import Any

from dmipro import tracing
from dmipro.tasks import task


@task("contract.where")
def where(payload: dict[str, Any]) -> dict[str, Any]:
    """The process the task ran in, and the trace context it ran under."""
    return {"pid": os.getpid(), "trace": tracing.inject()}
