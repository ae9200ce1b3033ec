"""The command line.

    paramserver serve --shards 4 --gpus-per-shard 0.5 [--ray-address auto] [--host 0.0.0.0] [--port 50051]
    paramserver serve --local --shards 2              # the same service in this process, without Ray
    paramserver status --address HOST:PORT --job NAME
    paramserver stop --address HOST:PORT

``serve`` runs in the foreground, prints ``serving on HOST:PORT`` once the front door is up, and exits
cleanly on SIGINT, SIGTERM or ``paramserver stop``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import grpc

from paramserver.hosting.serve import serve
from paramserver.service.local import serve_local
from paramserver.service.server import TLSConfig
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc


def _token(env: str | None) -> str | None:
    if not env:
        return None
    token = os.environ.get(env)
    if not token:
        raise SystemExit(f"environment variable {env} is empty or unset")
    return token


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
        client_ca = open(args.tls_client_ca, "rb").read() if args.tls_client_ca else None
        return TLSConfig(cert.read(), key.read(), client_ca)


def _serve(args: argparse.Namespace) -> int:
    common = dict(host=args.host, port=args.port, trusted_modules=tuple(args.trusted_module), auth_token=_token(args.auth_token_env), tls=_tls(args),
                  metrics_port=args.metrics_port)
    if args.local:
        service = serve_local(args.shards, **common)
    else:
        service = serve(
            args.shards, gpus_per_shard=args.gpus_per_shard, ray_address=args.ray_address, placement=args.placement,
            placement_timeout=args.placement_timeout, **common
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving on {service.address}", flush=True)
    while not stop.wait(0.5):
        if service.stop_requested():
            break
    service.shutdown()
    print("stopped", flush=True)
    return 0


def _channel(args: argparse.Namespace) -> tuple[pb_grpc.CoordinatorStub, tuple]:
    metadata = (("authorization", f"Bearer {_token(args.auth_token_env)}"),) if args.auth_token_env else ()
    return pb_grpc.CoordinatorStub(grpc.insecure_channel(args.address)), metadata


def _status(args: argparse.Namespace) -> int:
    stub, metadata = _channel(args)
    try:
        st = stub.GetStatus(pb.StatusRequest(job=args.job), timeout=args.timeout, metadata=metadata)
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"job {st.job}: step {st.version}, members {list(st.members)} of {st.num_workers} workers, "
          f"{st.skipped_steps} skipped, last total norm {st.last_total_norm:.4g}, lrs {[round(x, 8) for x in st.lrs]}")
    for s in st.shards:
        print(f"  shard {s.shard} at {s.address} on {s.placement}: version {s.version}, pushed by workers {list(s.pushed_workers)}")
    print(f"  waiting for: {st.waiting_for or 'nothing'}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    stub, metadata = _channel(args)
    try:
        stub.Stop(pb.StopRequest(), timeout=args.timeout, metadata=metadata)
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print("stop requested")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paramserver", description="A distributed optimizer service with sharded state.")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve", help="run the service in the foreground")
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--gpus-per-shard", type=float, default=0.0)
    s.add_argument("--ray-address", help="join this Ray cluster ('auto' for the local node's); default: embedded local Ray")
    s.add_argument("--placement", default="SPREAD", choices=["SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"])
    s.add_argument("--placement-timeout", type=float, default=60.0, help="seconds to wait for the shards' placement")
    s.add_argument("--local", action="store_true", help="run the shards in this process, without Ray")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--trusted-module", action="append", default=[], help="a module whose optimizers/schedulers may be named by path")
    s.add_argument("--auth-token-env", help="name of an environment variable holding the bearer token")
    s.add_argument("--metrics-port", type=int, help="expose Prometheus metrics on this port (shard actors: any free port)")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mTLS)")
    for name, helptext in (("status", "a job's step, members, shards and what a pending step waits for"), ("stop", "stop a running service")):
        c = commands.add_parser(name, help=helptext)
        c.add_argument("--address", required=True)
        c.add_argument("--auth-token-env")
        c.add_argument("--timeout", type=float, default=10.0)
        if name == "status":
            c.add_argument("--job", default="default")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return {"serve": _serve, "status": _status, "stop": _stop}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
