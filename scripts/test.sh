#!/usr/bin/env bash
# Installs everything the test suite needs into .venv, then runs it (CI runs this too).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -k tokens
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# the tests' OpenID provider (oidc-provider on Node), pinned by tests/idp/package-lock.json
(cd tests/idp && npm ci --no-audit --no-fund --loglevel=error)
exec .venv/bin/python -m pytest -q "$@"
