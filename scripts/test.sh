#!/usr/bin/env bash
# The whole test suite: services, lint, type-check, pytest. `make test` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

eval "$(bash scripts/services.sh)"
export DMIPRO_TEST_POSTGRES_URL

"$VENV/bin/ruff" check dmipro tests examples bench
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
