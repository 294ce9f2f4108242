#!/usr/bin/env bash
# Create bench/.venv-flower: a separate virtual environment with Flower's simulation runtime.
#
# torch is installed first, at the exact version the main environment has (2.13.0, a CPU
# wheel on local disk), then flwr[simulation] pinned, with torch pinned by a constraints file
# so that pip can never replace it (any other torch request downloads gigabytes).
# fedloom itself is not installed there. Idempotent: rerunning it only checks the versions.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/../.venv-flower"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
FLWR_VERSION="1.42.0"
RAY_VERSION="2.55.1"  # what flwr[simulation]==1.42.0 pins for Python 3.11

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

have() {  # have PACKAGE VERSION: is exactly that version installed in the venv?
    "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    installed = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if installed.split("+")[0] == sys.argv[2] else 1)
PYEOF
}

CONSTRAINTS="$(mktemp)"
REQS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS" "$REQS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

if ! have torch "$TORCH_VERSION"; then
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
fi
if ! have flwr "$FLWR_VERSION" || ! have ray "$RAY_VERSION"; then
    if ! "$PY" -m pip install --quiet -c "$CONSTRAINTS" "flwr[simulation]==$FLWR_VERSION"; then
        # flwr 1.42.0 asks for certifi>=2026.10.19, newer than the package index this machine
        # sees. Fallback: flwr without its dependencies, then those dependencies as its
        # metadata lists them (the `simulation` extra included), with certifi unpinned.
        echo "setup.sh: retrying flwr with its certifi floor relaxed" >&2
        "$PY" -m pip install --quiet --no-deps "flwr==$FLWR_VERSION"
        "$PY" - >"$REQS" <<'PYEOF'
from importlib.metadata import requires

for req in requires("flwr") or []:
    spec, _, marker = req.partition(";")
    spec = spec.strip()
    if "extra ==" in marker and "'simulation'" not in marker:
        continue
    if "extra ==" in marker and "python_full_version >= '3.13'" in marker:
        continue  # the other Python range of the same ray pin
    print("certifi" if spec.startswith("certifi") else spec)
PYEOF
        "$PY" -m pip install --quiet -c "$CONSTRAINTS" -r "$REQS"
    fi
fi
# Fail loudly if anything replaced torch.
have torch "$TORCH_VERSION" || { echo "torch is not $TORCH_VERSION in $VENV" >&2; exit 1; }
have flwr "$FLWR_VERSION" || { echo "flwr is not $FLWR_VERSION in $VENV" >&2; exit 1; }
"$PY" -c "import flwr, ray, torch; print('flwr', flwr.__version__, '| ray', ray.__version__, '| torch', torch.__version__)"
