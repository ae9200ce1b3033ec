"""The command line.

    paramserver serve --num-shards 4 --gpus-per-shard 0.5 [--ray-address auto] [--host 0.0.0.0] [--port 50051]
    paramserver serve --local --num-shards 2            # the same service in this process, without Ray
    paramserver status --address HOST:PORT --job NAME [--tls-ca CA.pem] [--auth-token-env VAR]
    paramserver stop --address HOST:PORT [--service-id ID] [--tls-ca CA.pem] [--auth-token-env VAR]
    paramserver delete --address HOST:PORT --job NAME [--tls-ca CA.pem] [--auth-token-env VAR]
    paramserver checkpoint --address HOST:PORT --job NAME [--tls-ca CA.pem] [--auth-token-env VAR]
    paramserver export --checkpoint-dir DIR --job NAME [--step N] --out FILE.pt

``serve``'s flags are made from the fields of ``ServerConfig`` and ``RayConfig`` (``--grpc-threads``,
``--chunk-bytes``, ``--cpus-per-shard``, ...), with their defaults and help texts; the few that cannot be a
plain value on a command line (the token, TLS material) are read from an environment variable or files.
``serve`` runs in the foreground, prints ``serving on HOST:PORT`` once the front door is up and then
``service id: ID`` (random per start), and exits cleanly on SIGINT, SIGTERM or ``paramserver stop`` (which asks
the service for its id first, or stops only the instance ``--service-id`` names). ``--help`` of every command
describes each flag with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from paramserver.core.config import PLACEMENT_STRATEGIES, RayConfig, ServerConfig, TLSConfig, field_docs

# Fields set on the command line by other means than their own flag: (flag, how).
_BY_OTHER_MEANS = {
    "auth_token": "--auth-token-env",
    "tls": "--tls-cert/--tls-key/--tls-client-ca",
    "trusted_modules": "--trusted-module (repeatable)",
}
_CLI_DEFAULTS = {"port": 50051}  # the service's well-known port; the Python API's default is 0 (any free one)
# Short spellings kept for existing scripts.
_ALIASES = {"num_shards": ["--shards"]}
# The job a command names when --job is not given: RemoteOptimizer's and ServiceClient's default (a test keeps
# them in step), so `paramserver status` finds the job a trainer made without naming one.
DEFAULT_JOB = "default"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, "(required)" for a required flag; a help text that says its
    default in words already ("(default: ...)") is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text or "%(default)" in text:
            return text
        if action.required:
            return f"{text} (required)"
        return f"{text} (default: %(default)s)"

T = TypeVar("T")


def _token(env: str | None) -> str | None:
    if not env:
        return None
    token = os.environ.get(env)
    if not token:
        raise SystemExit(f"environment variable {env} is empty or unset")
    return token


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    return TLSConfig(_read(args.tls_cert), _read(args.tls_key), _read(args.tls_client_ca))  # type: ignore[arg-type]


def _value_type(annotation: Any) -> type:
    """The plain type of a field: ``int | None`` -> int."""
    hint = typing.get_type_hints(ServerConfig).get(annotation) or typing.get_type_hints(RayConfig).get(annotation)
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def add_config_flags(parser: argparse.ArgumentParser, *configs: type) -> list[str]:
    """A flag for every plain field of ``configs`` (``grpc_threads`` -> ``--grpc-threads``); returns the
    names of the fields it made flags for."""
    made = []
    for cls in configs:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in _BY_OTHER_MEANS:
                continue
            kind = _value_type(f.name)
            default = _CLI_DEFAULTS.get(f.name, f.default)
            flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
            extra: dict[str, Any] = {"choices": PLACEMENT_STRATEGIES} if f.name == "placement" else {}
            if kind is bool:  # --name / --no-name (a type=bool flag would read "false" as True)
                extra, kind = {"action": argparse.BooleanOptionalAction}, None
            parser.add_argument(*flags, dest=f.name, type=kind, default=default, help=docs.get(f.name, ""), **extra)
            made.append(f.name)
    return made


def _serve(args: argparse.Namespace) -> int:
    from paramserver.hosting.serve import serve
    from paramserver.service.local import serve_local

    server_fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if f.name not in _BY_OTHER_MEANS}
    config = ServerConfig(
        **server_fields, trusted_modules=tuple(args.trusted_module), auth_token=_token(args.auth_token_env), tls=_tls(args)
    )
    if args.local:
        service = serve_local(config=config)
    else:
        ray_config = RayConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RayConfig)})
        service = serve(config=config, ray_config=ray_config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving on {service.address}", flush=True)
    print(f"service id: {service.service_id}", flush=True)
    while not stop.wait(0.5):
        if service.stop_requested():
            break
    service.shutdown()
    print("stopped", flush=True)
    return 0


def _client(args: argparse.Namespace):  # noqa: ANN202 - a workers.client.ServiceClient
    from workers.client import ServiceClient

    client_cert = (_read(args.tls_client_cert), _read(args.tls_client_key)) if args.tls_client_cert else None
    return ServiceClient(
        args.address, getattr(args, "job", DEFAULT_JOB), auth_token=_token(args.auth_token_env), root_certificates=_read(args.tls_ca),
        client_certificate=client_cert, timeout=args.timeout,  # type: ignore[arg-type]
    )


def _ask(args: argparse.Namespace, call: Callable[[Any], T]) -> T | None:
    """``call(client)`` on a client of ``args.address``; any error is reported in one line, with its class (None)."""
    client = _client(args)
    try:
        return call(client)
    except Exception as exc:  # noqa: BLE001 - reported, and the command exits 1
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    finally:
        client.close()


def _status(args: argparse.Namespace) -> int:
    st = _ask(args, lambda client: client.status())
    if st is None:
        return 1
    print(f"job {st.job}: step {st.version}, members {list(st.members)} of {st.num_workers} workers (epoch {st.epoch}), "
          f"{st.skipped_steps} skipped, last total norm {st.last_total_norm:.4g}, lrs {[round(x, 8) for x in st.lrs]}")
    print(f"  state: {st.state or 'unknown (an older server)'}")
    for s in st.shards:
        print(f"  shard {s.shard} at {s.address} on {s.placement}: version {s.version}, pushed by workers {list(s.pushed_workers)}")
    if st.transports:
        print("  transports: " + ", ".join(f"worker {w} {t}" for w, t in sorted(st.transports.items())))
    print(f"  waiting for: {st.waiting_for or 'nothing'}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    # the service's id first (GetServiceInfo), unless --service-id names the instance to stop
    service_id = _ask(args, lambda client: client.stop(args.service_id))
    if service_id is None:
        return 1
    print(f"stop requested of service {service_id}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    if _ask(args, lambda client: client.delete_job() or True) is None:
        return 1
    print(f"job {args.job} deleted (its checkpoints stay)")
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    step = _ask(args, lambda client: client.checkpoint())
    if step is None:
        return 1
    print(f"job {args.job}: checkpoint of step {step} written")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from paramserver.checkpoint import load_torch_state

    try:
        state = load_torch_state(args.checkpoint_dir, args.job, args.step)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    torch.save(state, args.out)
    print(f"job {args.job}: wrote {args.out} (model, optimizer, scheduler)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paramserver", description="A distributed optimizer service with sharded state.",
                                     formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=helptext, description=helptext, formatter_class=_HelpFormatter)

    s = command("serve", "run the service in the foreground (on Ray, or --local in this process)")
    add_config_flags(s, ServerConfig, RayConfig)
    s.add_argument("--local", action="store_true", help="run the shards in this process, without Ray")
    s.add_argument("--trusted-module", action="append", default=[],
                   help="a module whose optimizers/schedulers may be named by path; repeat it for several (default: none)")
    s.add_argument("--auth-token-env", help="name of an environment variable holding the bearer token that every call "
                   "but health checks must carry (default: none, no token needed)")
    s.add_argument("--tls-cert", help="the servers' certificate chain (PEM) (default: none, plaintext)")
    s.add_argument("--tls-key", help="the servers' private key (PEM), with --tls-cert (default: none)")
    s.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mTLS) (default: none, no client certificates)")
    for name, helptext in (
        ("status", "a job's state, step, members, shards and what a pending step waits for"),
        ("stop", "stop a running service (it asks the service for its id first, unless --service-id names it)"),
        ("delete", "delete a job: its state on every shard, its shared memory, its membership (its checkpoints stay)"),
        ("checkpoint", "write a checkpoint of a job now (the service needs --checkpoint-dir)"),
    ):
        c = command(name, helptext)
        c.add_argument("--address", required=True, help="the service's front door, HOST:PORT (what serve printed)")
        c.add_argument("--auth-token-env", help="name of an environment variable holding the bearer token (default: none, no token sent)")
        c.add_argument("--tls-ca", help="connect with TLS, trusting the server certificates this CA signed (PEM) (default: none, plaintext)")
        c.add_argument("--tls-client-cert", help="this client's certificate (PEM), for a server that demands mTLS; needs --tls-ca (default: none)")
        c.add_argument("--tls-client-key", help="this client's private key (PEM), with --tls-client-cert (default: none)")
        c.add_argument("--timeout", type=float, default=10.0, help="deadline of the call in seconds")
        if name in ("status", "checkpoint", "delete"):
            c.add_argument("--job", default=DEFAULT_JOB, help="the job's name (the default is RemoteOptimizer's job name)")
        if name == "stop":
            c.add_argument("--service-id", default=None, help="stop only the service instance with this id (what serve printed); "
                           "another one refuses (default: the id the service at --address reports)")
    e = command("export", "a job's checkpoint as one torch.save file of {model, optimizer, scheduler}")
    e.add_argument("--checkpoint-dir", required=True, help="the service's checkpoint directory")
    e.add_argument("--job", default=DEFAULT_JOB, help="the job's name (the default is RemoteOptimizer's job name)")
    e.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest valid one)")
    e.add_argument("--out", required=True, help="the file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tls_client_cert", None) and not getattr(args, "tls_ca", None):
        raise SystemExit("--tls-client-cert needs --tls-ca")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    commands = {"serve": _serve, "status": _status, "stop": _stop, "delete": _delete, "checkpoint": _checkpoint, "export": _export}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
