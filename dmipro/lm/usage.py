"""Token, call and cost accounting that is right across threads and processes.

Each task measures its own LM calls with :func:`metered` (DSPy's per-context usage
tracker, so calls made on other threads never leak in) and returns the totals in its
JSON result; the coordinator adds the results up. Costs come from litellm's bundled
price map, read offline. A model missing from it has an unknown cost (``cost_usd`` is
``None``), never a silent zero. The simulator's ``sim/*`` models are priced like
``gpt-4o-mini`` so budgets can be exercised offline; results say the price is simulated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from dspy.utils.usage_tracker import UsageTracker

from dmipro.lm.faults import FaultCounts

__all__ = ["ModelUsage", "Usage", "UsageMeter", "metered", "price_per_token"]

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

SIM_PRICE = (1.5e-07, 6e-07)
"""USD per input/output token charged for ``sim/*`` models: litellm's gpt-4o-mini rates."""


@cache
def price_per_token(model: str) -> tuple[float, float] | None:
    """(input, output) USD per token for ``model`` from litellm's offline map, or None."""
    if model.startswith("sim/") or model.startswith("openai/sim-"):
        return SIM_PRICE
    import litellm  # the env var above keeps its price map offline

    for key in (model, model.split("/", 1)[-1]):
        entry = litellm.model_cost.get(key)
        if entry and "input_cost_per_token" in entry:
            return float(entry["input_cost_per_token"]), float(entry.get("output_cost_per_token", 0.0))
    return None


@dataclass
class ModelUsage:
    """Totals for one model."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0

    def add(self, other: ModelUsage) -> None:
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd = (
            None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd
        )


@dataclass
class Usage:
    """LM usage per model; adds up across tasks. JSON round-trips through ``to_json``/``from_json``."""

    models: dict[str, ModelUsage] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(m.calls for m in self.models.values())

    @property
    def prompt_tokens(self) -> int:
        return sum(m.prompt_tokens for m in self.models.values())

    @property
    def completion_tokens(self) -> int:
        return sum(m.completion_tokens for m in self.models.values())

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_usd(self) -> float | None:
        """Total cost, or None when any model's price is unknown."""
        costs = [m.cost_usd for m in self.models.values()]
        return None if any(c is None for c in costs) else float(sum(c for c in costs if c is not None))

    def record(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Add one LM call."""
        price = price_per_token(model)
        cost = None if price is None else prompt_tokens * price[0] + completion_tokens * price[1]
        self.models.setdefault(model, ModelUsage()).add(ModelUsage(1, prompt_tokens, completion_tokens, cost))

    def add(self, other: Usage) -> Usage:
        """Add ``other`` into this one; returns self."""
        for model, usage in other.models.items():
            self.models.setdefault(model, ModelUsage()).add(usage)
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            name: {
                "calls": m.calls,
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens,
                "cost_usd": m.cost_usd,
            }
            for name, m in sorted(self.models.items())
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Usage:
        usage = cls()
        for name, m in (data or {}).items():
            usage.models[name] = ModelUsage(
                int(m["calls"]), int(m["prompt_tokens"]), int(m["completion_tokens"]), m.get("cost_usd")
            )
        return usage

    def summary(self) -> dict[str, Any]:
        """Flat totals for reports: calls, prompt/completion/total tokens, cost."""
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens": self.tokens,
            "cost_usd": self.cost_usd,
        }


class UsageMeter(UsageTracker):  # type: ignore[misc]
    """DSPy usage tracker that also counts calls and prices them into a :class:`Usage`.

    ``faults`` counts the failures, retries and rate-limit waits of the same calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.usage = Usage()
        self.faults = FaultCounts()

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        super().add_usage(lm, usage_entry)
        prompt = int(usage_entry.get("prompt_tokens") or usage_entry.get("input_tokens") or 0)
        completion = int(usage_entry.get("completion_tokens") or usage_entry.get("output_tokens") or 0)
        self.usage.record(lm, prompt, completion)


@contextmanager
def metered() -> Iterator[UsageMeter]:
    """Count every LM call made in this context (this thread or task) into a fresh meter."""
    import dspy

    meter = UsageMeter()
    with dspy.context(usage_tracker=meter):
        yield meter
