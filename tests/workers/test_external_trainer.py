"""The service as a plain process and trainers as plain processes that never import Ray."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]

TRAINER = """
import sys
from workers.demos.external_trainer import main
acc = main(sys.argv[1:])
assert "ray" not in sys.modules, "the external trainer imported Ray"
assert acc > 0.8, acc
"""


def test_external_trainers_against_a_server_process():
    server = subprocess.Popen(
        [sys.executable, "-m", "paramserver", "serve", "--local", "--shards", "2", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line
        address = line.split()[-1]
        trainers = [
            subprocess.Popen(
                [sys.executable, "-c", TRAINER, "--address", address, "--job", "ext", "--rank", str(r), "--num-workers", "2", "--epochs", "3"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for r in range(2)
        ]
        for t in trainers:
            out, _ = t.communicate(timeout=180)
            assert t.returncode == 0, out
            assert "test accuracy" in out
        status = subprocess.run([sys.executable, "-m", "paramserver", "status", "--address", address, "--job", "ext"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "job ext: step 66" in status.stdout and "members [] of 2 workers" in status.stdout, status.stdout
        stop = subprocess.run([sys.executable, "-m", "paramserver", "stop", "--address", address], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            out, _ = server.communicate(timeout=30)
    assert server.returncode == 0
    assert "stopped" in out
