"""Fixtures of the security suite: the session's shared Celery and RQ workers.

Every test here drives an attack for real, as an attacker with one of three powers
would: submitting a job, writing to the broker's Redis, or handing over a program file.
"""

from __future__ import annotations

from tests.integration.conftest import celery_stack, remote_stack, rq_stack

__all__ = ["celery_stack", "remote_stack", "rq_stack"]
