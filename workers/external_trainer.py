"""An external trainer: a plain process, no Ray, training against a running paramserver over gRPC.

    paramserver serve --shards 2 --port 50051 &
    python -m workers.external_trainer --address 127.0.0.1:50051 --job digits --rank 0 --num-workers 2 &
    python -m workers.external_trainer --address 127.0.0.1:50051 --job digits --rank 1 --num-workers 2

Each rank trains on its own part of every batch; the service averages, clips and updates.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from workers.remote_optimizer import RemoteOptimizer
from workers.train import accuracy, load_digits_split, make_model


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True)
    parser.add_argument("--job", default="external")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--auth-token-env", help="environment variable holding the bearer token")
    args = parser.parse_args(argv)

    torch.manual_seed(0)  # every rank builds the same model; rank 0's weights are the job's initial weights
    x_train, y_train, x_test, y_test = load_digits_split()
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    token = os.environ.get(args.auth_token_env) if args.auth_token_env else None
    steps_per_epoch = len(x_train) // args.batch_size
    with RemoteOptimizer(
        model.named_parameters(), "Adam", lr=3e-3, address=args.address, job=args.job, num_workers=args.num_workers,
        rank=args.rank, clip_grad_norm=1.0, scheduler="CosineAnnealingLR",
        scheduler_kwargs={"T_max": args.epochs * steps_per_epoch}, auth_token=token,
    ) as opt:
        for epoch in range(args.epochs):
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
            for b in range(steps_per_epoch):
                idx = order[b * args.batch_size : (b + 1) * args.batch_size][args.rank :: args.num_workers]
                opt.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
            print(f"rank {args.rank} epoch {epoch}: loss {loss.item():.4f} lr {opt.get_last_lr()[0]:.2e}", flush=True)
    acc = accuracy(model, x_test, y_test)
    print(f"rank {args.rank} test accuracy: {acc:.4f}", flush=True)
    return acc


if __name__ == "__main__":
    main()
