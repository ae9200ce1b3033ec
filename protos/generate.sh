#!/usr/bin/env bash
# Regenerate the checked-in Python code for the protos into paramserver/proto/v1/ (needs grpcio-tools):
#   protos/generate.sh [OUT_ROOT]
# tests/test_protos.py regenerates into a temporary folder and fails when the checked-in code has drifted.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/paramserver/proto/v1/paramserver.proto
