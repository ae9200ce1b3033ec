"""The main job: data-parallel training of a digit classifier through the step engine.

W workers, each with its own replica of the model and its own part of every batch, compute gradients in
parallel threads and push them to the engine; the engine averages them, clips them, runs Adam on its S
shards and a cosine schedule, and every worker copies the new weights into its replica. The dataset is
scikit-learn's 8x8 handwritten digits, which ships inside the package (no download).

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

import paramserver as ps


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
    engine = ps.StepEngine(
        model.named_parameters(),
        "Adam",
        config=ps.EngineConfig(num_shards=num_shards, num_workers=num_workers, clip=ps.ClipConfig(max_norm=1.0)),
        scheduler=ps.SchedulerSpec("CosineAnnealingLR", {"T_max": total_steps}),
        lr=lr,
        weight_decay=1e-4,
    )
    replicas = [copy.deepcopy(model) for _ in range(num_workers)]
    loss_fn = nn.CrossEntropyLoss()
    history: dict[str, list[float]] = {"loss": [], "lr": [], "grad_norm": []}

    def worker_step(rank: int, step: int, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, ps.StepResult | None]:
        replica = replicas[rank]
        part = slice(rank, None, num_workers)  # this worker's part of the batch
        replica.zero_grad(set_to_none=True)
        loss = loss_fn(replica(xb[part]), yb[part])
        loss.backward()
        result = engine.push(rank, step, [p.grad for p in replica.parameters()], metric=loss.item())
        return loss.item(), result

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=f"train {num_workers} workers x {num_shards} shards", unit="step")
    started = time.perf_counter()
    step = 0
    with ThreadPoolExecutor(num_workers) as pool:
        for epoch in range(epochs):
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + epoch))
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                xb, yb = x_train[idx], y_train[idx]
                lr_now = engine.get_last_lr()[0]
                outcomes = list(pool.map(lambda r: worker_step(r, step, xb, yb), range(num_workers)))
                result = next(r for _, r in outcomes if r is not None)
                weights = engine.parameters()  # broadcast: every worker takes version step+1
                for replica in replicas:
                    with torch.no_grad():
                        for p, w in zip(replica.parameters(), weights):
                            p.copy_(w)
                history["loss"].append(sum(loss for loss, _ in outcomes) / num_workers)
                history["lr"].append(lr_now)
                history["grad_norm"].append(result.total_norm)
                step += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", lr=f"{lr_now:.2e}")
                    bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started
    return {
        "steps": step,
        "seconds": elapsed,
        "test_accuracy": accuracy(replicas[0], x_test, y_test),
        "skipped_steps": engine.skipped_steps,
        "plan": engine.plan.describe(),
        "history": history,
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
    print(f"{out['steps']} steps in {out['seconds']:.1f}s, {out['skipped_steps']} skipped")
    print(f"test accuracy: {out['test_accuracy']:.4f}")
    print(f"plot: {args.out / 'training.png'}")


if __name__ == "__main__":
    main()
