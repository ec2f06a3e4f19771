#!/usr/bin/env bash
# The benchmark, from a fresh clone: installs what it needs into .venv, then runs
# benchmarks/run.py and benchmarks/vault.py (results in benchmarks/results/). Extra arguments
# go to run.py, e.g. scripts/bench.sh --seconds 3 --memory-seconds 0
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test,bench . scripts/venv.sh
# wrk (the second load generator) and redis-server (workers share sessions) from Debian
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
for tool in wrk redis-server; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/bin/$tool" ] || {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$tool" >/dev/null \
      || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$tool" >/dev/null; }
  }
done
# the Keycloak-shaped provider for exchange mode
(cd tests/idp && npm ci --no-audit --no-fund --loglevel=error)
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m benchmarks.run "$@"
exec .venv/bin/python -m benchmarks.vault
