"""The command line: `serve` takes every server option of the configuration tree as a flag, and `status` and
`stop` reach a server with mTLS and a token, as `serve` starts it."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from paramserver.__main__ import _BY_OTHER_MEANS, build_parser
from paramserver.core.config import RayConfig, ServerConfig
from tests.helpers.tls_certs import make_tls_material
from workers.remote_optimizer import RemoteOptimizer

ROOT = Path(__file__).resolve().parents[2]


def test_every_server_option_is_a_serve_flag_with_the_trees_default():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001 - argparse keeps them there
    actions = {a.dest: a for a in serve._actions}  # noqa: SLF001
    for cls in (ServerConfig, RayConfig):
        for f in dataclasses.fields(cls):
            if f.name in _BY_OTHER_MEANS:
                continue
            assert f.name in actions, f"{cls.__name__}.{f.name} has no flag"
            expected = 50051 if f.name == "port" else f.default
            assert actions[f.name].default == expected, f"--{f.name} defaults to {actions[f.name].default}, the tree says {expected}"
    args = build_parser().parse_args(["serve", "--grpc-threads", "8", "--chunk-bytes", "1048576", "--cpus-per-shard", "0.25",
                                      "--max-message-bytes", "4194304", "--shards", "3"])
    assert (args.grpc_threads, args.chunk_bytes, args.cpus_per_shard, args.max_message_bytes, args.num_shards) == (8, 2**20, 0.25, 4 * 2**20, 3)


def _run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paramserver", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def test_status_and_stop_reach_a_server_with_mtls_and_a_token(tmp_path):
    tls = make_tls_material()
    files = {}
    for name in ("ca", "server_chain", "server_key", "client_chain", "client_key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(getattr(tls, name))
    env = {**os.environ, "PS_TOKEN": "s3cret", "WRONG_TOKEN": "nope"}
    server = subprocess.Popen(
        [sys.executable, "-m", "paramserver", "serve", "--local", "--num-shards", "2", "--host", "127.0.0.1", "--port", "0",
         "--auth-token-env", "PS_TOKEN", "--tls-cert", str(files["server_chain"]), "--tls-key", str(files["server_key"]),
         "--tls-client-ca", str(files["ca"])],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line
        address = line.split()[-1]
        tls_flags = ["--tls-ca", str(files["ca"]), "--tls-client-cert", str(files["client_chain"]), "--tls-client-key", str(files["client_key"])]
        model = torch.nn.Linear(3, 2)
        opt = RemoteOptimizer(model.named_parameters(), "SGD", lr=0.1, address=address, job="cli", auth_token="s3cret",
                              root_certificates=tls.ca, client_certificate=(tls.client_chain, tls.client_key))
        try:
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            status = _run("status", "--address", address, "--job", "cli", "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        finally:
            opt.close()
        assert status.returncode == 0, status.stderr
        assert "job cli: step 1, members [0] of 1 workers" in status.stdout, status.stdout
        assert "transports: worker 0 shared_memory" in status.stdout  # the control messages went with the token over mTLS
        missing = _run("status", "--address", address, "--job", "nothing", "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert missing.returncode == 1 and "no job 'nothing'" in missing.stderr, missing.stderr
        wrong = _run("status", "--address", address, "--auth-token-env", "WRONG_TOKEN", *tls_flags, env=env)
        assert wrong.returncode == 1 and "token" in wrong.stderr, wrong.stderr
        plaintext = _run("stop", "--address", address, "--auth-token-env", "PS_TOKEN", "--timeout", "3", env=env)
        assert plaintext.returncode == 1, plaintext.stdout
        assert server.poll() is None, "a stop without TLS must not stop the server"
        stop = _run("stop", "--address", address, "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert stop.returncode == 0, stop.stderr
        out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            out, _ = server.communicate(timeout=30)
    assert server.returncode == 0 and "stopped" in out
