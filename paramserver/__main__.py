"""The command line: ``paramserver serve`` runs the service in the foreground as a plain process.

    paramserver serve --shards 2 --host 127.0.0.1 --port 50051 [--trusted-module mypkg] [--auth-token-env VAR]

It prints ``serving on HOST:PORT`` once every server is up, and exits cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from paramserver.server import TLSConfig, serve


def _serve(args: argparse.Namespace) -> int:
    token = os.environ.get(args.auth_token_env) if args.auth_token_env else None
    if args.auth_token_env and not token:
        print(f"environment variable {args.auth_token_env} is empty or unset", file=sys.stderr)
        return 2
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("--tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            client_ca = open(args.tls_client_ca, "rb").read() if args.tls_client_ca else None
            tls = TLSConfig(cert.read(), key.read(), client_ca)
    service = serve(args.shards, host=args.host, port=args.port, trusted_modules=tuple(args.trusted_module), auth_token=token, tls=tls)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving on {service.address}", flush=True)
    stop.wait()
    service.shutdown()
    print("stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paramserver", description="A distributed optimizer service with sharded state.")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve", help="run the coordinator and the shards in this process, in the foreground")
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--trusted-module", action="append", default=[], help="a module whose optimizers/schedulers may be named by path")
    s.add_argument("--auth-token-env", help="name of an environment variable holding the bearer token")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mTLS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
