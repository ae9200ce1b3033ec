"""The main job: data-parallel training of a digit classifier through the service, on an embedded local Ray.

The service starts on Ray (S shard actors and the coordinator actor, gRPC on 127.0.0.1). W worker actors,
each with its own replica of the model, its own part of every batch and a ``RemoteOptimizer``, push
gradients over gRPC; the service averages them, clips them, runs Adam on its shards and a cosine schedule,
and every worker receives the new weights into its replica. The dataset is scikit-learn's 8x8 handwritten
digits, which ships inside the package (no download).

    python -m workers.demos.train --workers 2 --shards 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from workers.remote_optimizer import RemoteOptimizer

DEFAULT_JOB = "default"  # the job name RemoteOptimizer, ServiceClient and the CLI default to


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


def digits_worker(
    rank: int,
    num_workers: int,
    address: str,
    job: str = DEFAULT_JOB,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    auth_token: str | None = None,
) -> dict:
    """One data-parallel worker: its part of every batch, a RemoteOptimizer, the test accuracy at the end."""
    torch.manual_seed(seed)  # every rank builds the same model; rank 0's weights are the job's initial weights
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    steps_per_epoch = len(x_train) // batch_size
    total_steps = epochs * steps_per_epoch
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    lrs: list[float] = []
    with RemoteOptimizer(
        model.named_parameters(), "Adam", lr=lr, weight_decay=1e-4, address=address, job=job,
        num_workers=num_workers, rank=rank, clip_grad_norm=1.0, auth_token=auth_token,
        scheduler="CosineAnnealingLR", scheduler_kwargs={"T_max": total_steps},
    ) as opt:
        for epoch in range(epochs):
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + epoch))
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size][rank::num_workers]  # this worker's part
                opt.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                loss.backward()
                if rank == 0:
                    lrs.append(opt.get_last_lr()[0])
                opt.step()
                losses.append(loss.item())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"rank": rank, "losses": losses, "lrs": lrs, "test_accuracy": accuracy(model, x_test, y_test), "weights": flat}


def train(
    num_workers: int = 2,
    num_shards: int = 2,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    service_address: str | None = None,
    ray_address: str | None = None,
    job: str = DEFAULT_JOB,
    auth_token: str | None = None,
) -> dict:
    """Launch the workers on Ray and gather what they report. Without ``service_address`` the service starts
    here on Ray too (embedded local Ray unless ``ray_address`` names a cluster)."""
    import contextlib

    import ray

    import paramserver
    from workers.client import ServiceClient
    from workers.launcher import run_workers

    total_steps = epochs * (len(load_digits_split(seed)[0]) // batch_size)
    bar = None
    started = time.perf_counter()
    if service_address is not None and not ray.is_initialized():
        ray.init(address=ray_address or "local", log_to_driver=False)
    with contextlib.ExitStack() as stack:
        service = None if service_address else stack.enter_context(paramserver.serve(num_shards, ray_address=ray_address))
        address = service_address or service.address
        watcher = ServiceClient(address, job, auth_token=auth_token, timeout=10.0)

        def show_progress() -> None:
            nonlocal bar
            if not progress:
                return
            try:
                status = watcher.status()
            except (LookupError, ConnectionError, TimeoutError):
                return  # the job is not created yet
            if bar is None:
                if status.version == 0:
                    return  # the bar starts with the first step (after Ray's and the service's start-up messages)
                from tqdm import tqdm

                bar = tqdm(total=total_steps, initial=status.version, desc=f"train {num_workers} workers x {num_shards} shards", unit="step")
            bar.update(status.version - bar.n)
            bar.set_postfix(lr=f"{status.lrs[0]:.2e}", grad_norm=f"{status.last_total_norm:.3f}")

        config = {"address": address, "job": job, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "auth_token": auth_token}
        results = run_workers(digits_worker, num_workers, config=config, on_wait=show_progress)
        show_progress()
        placements = service.placements() if service is not None else []
        watcher.close()
    if bar is not None:
        bar.close()
    losses = torch.tensor([r["losses"] for r in results]).mean(0).tolist()  # the loss averaged over the workers
    return {
        "steps": total_steps,
        "seconds": time.perf_counter() - started,
        "test_accuracy": results[0]["test_accuracy"],
        "replicas_equal": all(torch.equal(results[0]["weights"], r["weights"]) for r in results[1:]),
        "placements": placements,
        "history": {"loss": losses, "lr": results[0]["lrs"]},
        "config": {"workers": num_workers, "shards": num_shards, "epochs": epochs, "batch_size": batch_size, "lr": lr},
    }


def plot(history: dict[str, list[float]], path: Path, config: dict | None = None, test_accuracy: float | None = None) -> None:
    """The loss averaged over the workers (each step, and smoothed) and the learning rate, under a title with
    the run's configuration and its final test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = history["loss"]
    window = max(1, len(loss) // 30)
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_loss.plot(loss, lw=0.6, alpha=0.45, label="loss, mean over the workers")
    ax_loss.plot(smooth, lw=1.6, label=f"smoothed ({window} steps)")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_lr.plot(history["lr"], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    if config is not None:
        title = (f"digits: {config['workers']} workers x {config['shards']} shards, Adam lr {config['lr']:g}, cosine, clip 1.0, "
                 f"batch {config['batch_size']}, {config['epochs']} epochs")
        if test_accuracy is not None:
            title += f"\nfinal test accuracy {test_accuracy:.4f}"
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="data-parallel worker actors")
    parser.add_argument("--shards", type=int, default=2, help="shard actors of the service")
    parser.add_argument("--epochs", type=int, default=15, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over the workers")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (then a cosine decay)")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="where the plot and metrics.json go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--service", help="train through a running service at HOST:PORT instead of starting one")
    parser.add_argument("--ray-address", help="the Ray cluster to run on ('auto' inside `ray job submit`); default: embedded")
    parser.add_argument("--job", default=DEFAULT_JOB, help="the job's name on the service")
    parser.add_argument("--auth-token-env", help="environment variable holding the service's bearer token")
    args = parser.parse_args()
    token = os.environ.get(args.auth_token_env) if args.auth_token_env else None
    out = train(args.workers, args.shards, args.epochs, args.batch_size, args.lr, progress=not args.no_progress,
                service_address=args.service, ray_address=args.ray_address, job=args.job, auth_token=token)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(out["history"], args.out / "training.png", out["config"], out["test_accuracy"])
    (args.out / "metrics.json").write_text(json.dumps({k: v for k, v in out.items()}, indent=1))
    for p in out["placements"]:
        who = "coordinator" if p["shard"] is None else f"shard {p['shard']}"
        print(f"{who}: {p['address']} on node {p['node_id'][:12]} ({p['device']}, pid {p['pid']})")
    print(f"{out['steps']} steps in {out['seconds']:.1f}s; worker replicas identical: {out['replicas_equal']}")
    print(f"test accuracy: {out['test_accuracy']:.4f}")
    print(f"plot: {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
