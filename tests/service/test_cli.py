"""The command line: `serve` takes every server option of the configuration tree as a flag; `status`, `delete` and
`stop` reach a server with mTLS and a token, as `serve` starts it; `stop` stops only the instance it names;
`--help` of every command describes every flag with its default; the CLI's default job is the trainers'."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paramserver.__main__ import _BY_OTHER_MEANS, DEFAULT_JOB, build_parser, main
from paramserver.core.config import RayConfig, ServerConfig
from tests.helpers.tls_certs import make_tls_material
from workers.client import ServiceClient
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
    # a yes/no field is a pair of flags (a typed flag would read "--control-lane false" as True)
    assert build_parser().parse_args(["serve", "--no-control-lane"]).control_lane is False
    assert build_parser().parse_args(["serve", "--control-lane"]).control_lane is True


def _commands() -> dict[str, object]:
    return build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them there


def _flag_entries(help_text: str) -> dict[str, tuple[str, str]]:
    """Each flag's entry of a --help text: {"--flag": (its usage, its description with its lines joined)}."""
    section = help_text.split("options:", 1)[1]
    entries: list[tuple[str, list[str]]] = []
    for line in section.splitlines():
        if re.match(r"^  -", line):
            usage, *rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            entries.append((usage, rest))
        elif line.startswith("   ") and entries:
            entries[-1][1].append(line.strip())
    found = {}
    for usage, lines in entries:
        description = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(lines))  # argparse breaks long words at hyphens
        for flag in re.findall(r"(?:^|, )(--?[\w-]+)", usage):
            found[flag] = (usage, description)
    return found


@pytest.mark.parametrize("command", ["serve", "status", "stop", "delete", "checkpoint", "export"])
def test_help_of_every_command_describes_every_flag_with_its_default(command, capsys):
    assert command in _commands()
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    entries = _flag_entries(capsys.readouterr().out)
    for action in _commands()[command]._actions:  # noqa: SLF001
        if "--help" in action.option_strings:
            continue
        for flag in action.option_strings:
            assert flag in entries, f"{command} {flag}: not in --help"
            _, description = entries[flag]
            default = re.search(r"\((?:default: (.*)|required)\)$", description)
            assert default, f"{command} {flag}: no default shown: {description!r}"
            assert description[: default.start()].strip(), f"{command} {flag}: no description"
            if default.group(1) is not None and action.default not in (None, [], False):
                assert str(action.default) in default.group(1), f"{command} {flag}: shows {default.group(1)!r}, the default is {action.default!r}"


def test_every_command_is_listed_with_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in _commands():
        assert re.search(rf"^    {command}\s+\S", out, re.M) or re.search(rf"^    {command}\n\s+\S", out, re.M), command


def test_the_cli_and_the_trainers_default_to_one_job_name():
    def default(fn: object) -> object:
        return inspect.signature(fn).parameters["job"].default

    assert default(RemoteOptimizer.__init__) == default(ServiceClient.__init__) == DEFAULT_JOB
    for command in ("status", "delete", "checkpoint", "export"):
        args = build_parser().parse_args([command, "--address", "h:1"] if command != "export" else [command, "--checkpoint-dir", "d", "--out", "o"])
        assert args.job == DEFAULT_JOB, command


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
        id_line = server.stdout.readline()
        assert re.fullmatch(r"service id: [0-9a-f]{32}\n", id_line), id_line
        service_id = id_line.split()[-1]
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
        assert "job cli: step 1, members [0] of 1 workers" in status.stdout and "\n  state: running\n" in status.stdout, status.stdout
        assert "transports: worker 0 shared_memory" in status.stdout  # the control messages went with the token over mTLS
        finished = _run("status", "--address", address, "--job", "cli", "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert "job cli: step 1, members [] of 1 workers" in finished.stdout, finished.stdout + finished.stderr
        assert "\n  state: finished\n" in finished.stdout, finished.stdout
        missing = _run("status", "--address", address, "--job", "nothing", "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert missing.returncode == 1 and "no job 'nothing'" in missing.stderr, missing.stderr
        wrong = _run("status", "--address", address, "--auth-token-env", "WRONG_TOKEN", *tls_flags, env=env)
        assert wrong.returncode == 1 and "token" in wrong.stderr, wrong.stderr
        delete = _run("delete", "--address", address, "--job", "cli", "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert delete.returncode == 0 and "job cli deleted" in delete.stdout, delete.stderr
        gone = _run("status", "--address", address, "--job", "cli", "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert gone.returncode == 1 and "JobNotFoundError: no job 'cli'" in gone.stderr and "Traceback" not in gone.stderr, gone.stderr
        plaintext = _run("stop", "--address", address, "--auth-token-env", "PS_TOKEN", "--timeout", "3", env=env)
        assert plaintext.returncode == 1, plaintext.stdout
        assert server.poll() is None, "a stop without TLS must not stop the server"
        other = _run("stop", "--address", address, "--service-id", "0" * 32, "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert other.returncode == 1 and other.stderr.startswith("WrongServiceError: this is service"), other.stderr
        assert server.poll() is None, "a stop naming another service must not stop the server"
        stop = _run("stop", "--address", address, "--auth-token-env", "PS_TOKEN", *tls_flags, env=env)
        assert stop.returncode == 0 and f"stop requested of service {service_id}" in stop.stdout, stop.stderr
        out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            out, _ = server.communicate(timeout=30)
    assert server.returncode == 0 and "stopped" in out
