#!/usr/bin/env bash
# Installs everything the test suite needs into .venv, then runs it (CI runs this too).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -k tokens
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test . scripts/venv.sh
# Debian's packages need root, or sudo, on CI machines
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
# a real Redis for the session-sharing tests
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server >/dev/null; }
  # the package starts a system service on 6379; the tests start their own on a free port
  ($SUDO systemctl stop redis-server 2>/dev/null || $SUDO service redis-server stop 2>/dev/null || true) >/dev/null
fi
# HAProxy, the load balancer in front of three replicas in the HA test (tests/integration/test_ha.py)
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy >/dev/null; }
  ($SUDO systemctl stop haproxy 2>/dev/null || $SUDO service haproxy stop 2>/dev/null || true) >/dev/null
fi
# the tests' OpenID provider (oidc-provider on Node), pinned by tests/idp/package-lock.json
(cd tests/idp && npm ci --no-audit --no-fund --loglevel=error)
# real MCP clients the tests drive (mcp-remote, the Inspector CLI, the conformance suite), pinned by tests/clients/package-lock.json
# (npm install, not ci: the Inspector's vite names a Windows-only optional dependency that npm
# leaves out of a lock file made on Linux, and `npm ci` then refuses the lock; install honours it)
(cd tests/clients && npm install --no-audit --no-fund --loglevel=error)
exec .venv/bin/python -m pytest -q "$@"
