"""The main job: data-parallel training of a digit classifier through the service.

The service (a coordinator and S shard gRPC servers) starts in this process on 127.0.0.1. W workers, each
with its own replica of the model, its own part of every batch and a ``RemoteOptimizer``, push gradients
over gRPC; the service averages them, clips them, runs Adam on its S shards and a cosine schedule, and
every worker receives the new weights into its replica. The dataset is scikit-learn's 8x8 handwritten
digits, which ships inside the package (no download).

    python -m workers.train --workers 2 --shards 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from paramserver.server import serve_local as serve
from workers.remote_optimizer import RemoteOptimizer


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train(
    num_workers: int = 2,
    num_shards: int = 2,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    steps_per_epoch = len(x_train) // batch_size
    total_steps = epochs * steps_per_epoch
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    losses = torch.zeros(num_workers, total_steps)
    lrs: list[float] = []
    replicas = [copy.deepcopy(model) for _ in range(num_workers)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=f"train {num_workers} workers x {num_shards} shards", unit="step")

    def worker(rank: int, address: str) -> None:
        replica = replicas[rank]
        with RemoteOptimizer(
            replica.named_parameters(), "Adam", lr=lr, weight_decay=1e-4, address=address, job="digits",
            num_workers=num_workers, rank=rank, clip_grad_norm=1.0,
            scheduler="CosineAnnealingLR", scheduler_kwargs={"T_max": total_steps},
        ) as opt:
            step = 0
            for epoch in range(epochs):
                order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + epoch))
                for b in range(steps_per_epoch):
                    idx = order[b * batch_size : (b + 1) * batch_size][rank::num_workers]  # this worker's part
                    opt.zero_grad()
                    loss = loss_fn(replica(x_train[idx]), y_train[idx])
                    loss.backward()
                    if rank == 0:
                        lrs.append(opt.get_last_lr()[0])
                    opt.step()
                    losses[rank, step] = loss.item()
                    step += 1
                    if bar is not None and rank == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lrs[-1]:.2e}")
                        bar.update(1)

    started = time.perf_counter()
    with serve(num_shards) as service:
        with ThreadPoolExecutor(num_workers) as pool:
            for f in [pool.submit(worker, r, service.address) for r in range(num_workers)]:
                f.result(timeout=3600)
        plan = service.coordinator.job("digits").coordinator.plan.describe()
    if bar is not None:
        bar.close()
    return {
        "steps": total_steps,
        "seconds": time.perf_counter() - started,
        "test_accuracy": accuracy(replicas[0], x_test, y_test),
        "replicas_equal": all(torch.equal(a, b) for r in replicas[1:] for a, b in zip(replicas[0].parameters(), r.parameters())),
        "plan": plan,
        "history": {"loss": losses.mean(0).tolist(), "lr": lrs},
    }


def plot(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot(history["loss"], lw=0.8)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_lr.plot(history["lr"], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    out = train(args.workers, args.shards, args.epochs, args.batch_size, args.lr, progress=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(out["history"], args.out / "training.png")
    (args.out / "metrics.json").write_text(json.dumps({k: v for k, v in out.items()}, indent=1))
    print(out["plan"])
    print(f"{out['steps']} steps in {out['seconds']:.1f}s; worker replicas identical: {out['replicas_equal']}")
    print(f"test accuracy: {out['test_accuracy']:.4f}")
    print(f"plot: {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
