# Shared by scripts/demo and scripts/test: make .venv (if missing) and install the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ -z "${PLANT_SKIP_INSTALL:-}" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${PLANT_EXTRAS:-dev}]"
fi
