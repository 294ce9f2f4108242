#!/usr/bin/env bash
# Regenerate fedloom's gRPC modules from src/fedloom/proto/fedloom.proto:
#   src/fedloom/proto/fedloom_pb2.py       messages
#   src/fedloom/proto/fedloom_pb2.pyi      their type stubs (mypy reads these)
#   src/fedloom/proto/fedloom_pb2_grpc.py  the Federation service stub and servicer
# Needs grpcio-tools (in the dev extra: pip install -e '.[dev]'). The generated files are
# committed; run this after every change to the .proto, with the grpcio-tools version the dev
# extra pins (the generated code requires a grpcio at least as new as the generator).
# They are excluded from ruff and mypy (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I src \
  --python_out=src --pyi_out=src --grpc_python_out=src \
  src/fedloom/proto/fedloom.proto
echo "generated: $(ls src/fedloom/proto/fedloom_pb2*)"
