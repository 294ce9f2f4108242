#!/usr/bin/env bash
# Install fedloom with its development extras, then run every check CI runs:
# ruff (lint + format), mypy (strict on the package) and the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
export FEDLOOM_DATA="${FEDLOOM_DATA:-$(cd .. && pwd)/shared/data}"
ruff check src tests bench
ruff format --check src tests bench
mypy
python -m pytest "$@"
