# Sourced by scripts/test.sh and scripts/bench.sh: creates .venv if needed and installs the
# project with the extras named in $EXTRAS (e.g. "test" or "test,bench").
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
