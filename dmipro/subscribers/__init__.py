"""Observability subscribers: OpenTelemetry, Langfuse and New Relic.

Each backend is an event-bus :class:`~dmipro.events.Subscriber` plus, where it records
LM calls, an :class:`~dmipro.lm.callbacks.LMCallListener`. They are switched on by
:func:`dmipro.observability.setup` from ``Settings.subscribers``; this package holds
what they share: the known names and their extras, and the scrubbing that keeps API
keys out of everything exported.

Scrubbing has two rules. A value stored under a secret-looking key (``api_key``,
``secret``, ``token``, ``authorization``, ``password``...) is replaced whole; and any
string that contains the value of a secret-looking environment variable
(``OPENAI_API_KEY``, ``LANGFUSE_SECRET_KEY``...), a bearer token or an ``sk-`` key has
that part replaced. Token *counts* (``input_tokens``) are not secrets and pass.
Importing this package needs none of the optional libraries.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "EXTRAS",
    "KNOWN_SUBSCRIBERS",
    "REDACTED",
    "flat_attributes",
    "is_secret_key",
    "scrub",
    "scrub_text",
    "secret_values",
]

KNOWN_SUBSCRIBERS: tuple[str, ...] = ("otel", "langfuse", "newrelic")
"""The names ``Settings.subscribers`` accepts."""

EXTRAS: dict[str, str] = {"otel": "otel", "langfuse": "langfuse", "newrelic": "newrelic"}
"""The ``dmipro[...]`` extra that installs each subscriber's library."""

REDACTED = "[REDACTED]"

_SECRET_NAME = re.compile(
    r"(^|[_\-.])(api_?key|apikey|secret|secret_?key|client_?secret|password|passwd|authorization|auth|"
    r"credentials?|token|access_?token|refresh_?token|auth_?token|bearer|license_?key|access_?key|"
    r"private_?key|cookie)$",
    re.IGNORECASE,
)
_SECRET_PATTERNS = (
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{12,}"),
)
_MIN_SECRET_LEN = 8
_MAX_TEXT = 4000


def is_secret_key(key: str) -> bool:
    """Whether a mapping key or attribute name looks like it holds a credential."""
    last = key.rsplit(".", 1)[-1]
    return bool(_SECRET_NAME.search(last))


def secret_values(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Values of secret-looking environment variables, longest first (so overlaps mask fully)."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if is_secret_key(k.lower()) and len(v) >= _MIN_SECRET_LEN}
    return tuple(sorted(found, key=len, reverse=True))


def scrub_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with known secret values, bearer tokens and ``sk-`` keys replaced."""
    for secret in secret_values() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def scrub(value: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of ``value`` (nested dicts, lists, strings) safe to export; see the module docstring."""
    known = tuple(secret_values() if secrets is None else secrets)
    return _scrub(value, known)


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if is_secret_key(str(k)) and v is not None else _scrub(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, secrets) for v in value]
    return value


def flat_attributes(
    data: Mapping[str, Any], prefix: str = "", *, max_text: int = _MAX_TEXT
) -> dict[str, Any]:
    """Scrubbed, flattened ``data`` as OpenTelemetry attributes (``a.b`` keys, primitive values).

    None values are dropped; homogeneous lists of primitives stay lists; anything else
    becomes compact JSON text; long text is cut at ``max_text`` characters.
    """
    out: dict[str, Any] = {}
    _flatten(scrub(dict(data)), prefix, out, max_text)
    return out


def _flatten(value: Any, key: str, out: dict[str, Any], max_text: int) -> None:
    if value is None:
        return
    if isinstance(value, Mapping) and key.count(".") < 4:
        for k, v in value.items():
            _flatten(v, f"{key}.{k}" if key else str(k), out, max_text)
        return
    if isinstance(value, bool | int | float):
        out[key] = value
    elif isinstance(value, str):
        out[key] = value[:max_text]
    elif (
        isinstance(value, list)
        and value
        and len({type(v) for v in value}) == 1
        and isinstance(value[0], str | bool | int | float)
    ):
        out[key] = [v[:max_text] if isinstance(v, str) else v for v in value]
    else:
        out[key] = json.dumps(value, default=str, separators=(",", ":"))[:max_text]

