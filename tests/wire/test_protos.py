"""The checked-in generated code matches what protos/generate.sh makes from the protos."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["paramserver_pb2.py", "paramserver_pb2.pyi", "paramserver_pb2_grpc.py"]


def test_generated_code_matches_protos(tmp_path):
    subprocess.run([str(ROOT / "protos" / "generate.sh"), str(tmp_path)], check=True, timeout=60)
    for name in GENERATED:
        fresh = (tmp_path / "paramserver" / "wire" / "proto" / "v1" / name).read_text()
        checked_in = (ROOT / "paramserver" / "wire" / "proto" / "v1" / name).read_text()
        assert fresh == checked_in, f"paramserver/wire/proto/v1/{name} is stale: run protos/generate.sh"
