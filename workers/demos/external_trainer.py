"""An external trainer: a plain process, no Ray, training against a running paramserver over gRPC.

    paramserver serve --shards 2 --port 50051 &
    python -m workers.demos.external_trainer --address 127.0.0.1:50051 --job digits --rank 0 --num-workers 2 &
    python -m workers.demos.external_trainer --address 127.0.0.1:50051 --job digits --rank 1 --num-workers 2

Each rank trains on its own part of every batch; the service averages, clips and updates.
"""

from __future__ import annotations

import argparse
import os

from workers.demos.train import digits_worker


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True)
    parser.add_argument("--job", default="default", help="the job's name (the default of RemoteOptimizer and the CLI)")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--auth-token-env", help="environment variable holding the bearer token")
    args = parser.parse_args(argv)
    token = os.environ.get(args.auth_token_env) if args.auth_token_env else None
    result = digits_worker(
        args.rank, args.num_workers, args.address, job=args.job, epochs=args.epochs, batch_size=args.batch_size, auth_token=token
    )
    print(f"rank {args.rank}: final loss {result['losses'][-1]:.4f}, test accuracy: {result['test_accuracy']:.4f}", flush=True)
    return result["test_accuracy"]


if __name__ == "__main__":
    main()
