#!/usr/bin/env bash
# Regenerate the checked-in Python code of the protos (needs grpcio-tools):
#   protos/generate.sh [OUT_ROOT]
# protos/paramserver/v1/paramserver.proto (package paramserver.v1) becomes the Python package
# paramserver.wire.proto.v1: the include path maps that folder to where the generated code lives.
# tests/wire/test_protos.py regenerates into a temporary folder and fails when the checked-in code has drifted.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iparamserver/wire/proto=protos/paramserver --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" protos/paramserver/v1/paramserver.proto
