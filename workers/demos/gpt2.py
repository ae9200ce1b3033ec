"""A GPT-2 from ``transformers`` trained byte-level through the service, with the recipe people use.

The model is built from a small ``GPT2Config`` (no download): 256 byte tokens, tied input and output
embeddings. The text is the standard library's own Python sources, which ship with every Python. Each of W
worker actors trains on its own windows of that text with a ``RemoteOptimizer``: AdamW with weight decay off
for biases and norms (two param groups), a linear warmup then a cosine decay (``SequentialLR``), and
``clip_grad_norm`` 1.0, all run by the service. It prints the loss and writes a plot.

    python -m workers.demos.gpt2 --workers 2 --shards 2 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB = 256  # bytes
RECIPE = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def stdlib_text(limit: int = 2_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's ``*.py`` files, in sorted path order, as token ids."""
    root = Path(os.__file__).parent
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return torch.frombuffer(bytearray(out[:limit]), dtype=torch.uint8).long()


def make_gpt2(seed: int = 0, block: int = 64, n_embd: int = 64, n_layer: int = 2, n_head: int = 4) -> nn.Module:
    """A small GPT-2 with tied embeddings; dropout off, so that a step depends on its data alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head, tie_word_embeddings=True,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,  # bytes: no special tokens
    )
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "the output layer is the input embedding"
    return model


def param_groups(model: nn.Module, weight_decay: float = RECIPE["weight_decay"]) -> list[dict[str, Any]]:
    """Weight decay on the matrices (and the tied embedding); off for biases and LayerNorm weights."""
    named = list(model.named_parameters())  # a tied parameter appears once
    return [
        {"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]


def schedule(warmup: int, total: int) -> tuple[str, dict[str, Any]]:
    """Linear warmup over ``warmup`` steps, then cosine to zero at ``total``: the scheduler and its arguments."""
    return "SequentialLR", {
        "schedulers": [("LinearLR", {"start_factor": 0.01, "total_iters": warmup}), ("CosineAnnealingLR", {"T_max": max(1, total - warmup)})],
        "milestones": [warmup],
    }


def local_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``schedule`` built locally, for a reference run."""
    lr = torch.optim.lr_scheduler
    return lr.SequentialLR(
        optimizer, [lr.LinearLR(optimizer, start_factor=0.01, total_iters=warmup), lr.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))],
        milestones=[warmup],
    )


def batch(data: torch.Tensor, step: int, rank: int, size: int = 8, block: int = 64) -> torch.Tensor:
    """``size`` windows of ``block`` tokens for (step, rank): the same in every run."""
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    starts = torch.randint(0, len(data) - block, (size,), generator=gen)
    return torch.stack([data[s : s + block] for s in starts.tolist()])


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss  # next-byte cross-entropy (the model shifts the labels)


def train_worker(rank: int, num_workers: int, address: str, steps: int, warmup: int, job: str = "gpt2", text_bytes: int = 2_000_000,
                 threads: int = 1) -> list[float]:
    """One worker's whole run; returns its loss at every step."""
    from workers.remote_optimizer import RemoteOptimizer

    torch.set_num_threads(threads)
    data = stdlib_text(text_bytes)
    model = make_gpt2()
    name, kwargs = schedule(warmup, steps)
    losses = []
    with RemoteOptimizer(param_groups(model), torch.optim.AdamW, address=address, job=job, num_workers=num_workers, rank=rank,
                         clip_grad_norm=1.0, scheduler=name, scheduler_kwargs=kwargs, timeout=300,
                         **{k: v for k, v in RECIPE.items() if k != "weight_decay"}) as opt:
        for step in range(opt.step_count, steps):
            opt.zero_grad()
            loss = loss_of(model, batch(data, step, rank))
            loss.backward()
            opt.step()
            losses.append(float(loss))
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="data-parallel worker actors")
    parser.add_argument("--shards", type=int, default=2, help="shard actors of the service")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--warmup", type=int, default=20, help="steps of linear warmup before the cosine decay")
    parser.add_argument("--out", type=Path, default=Path("runs/gpt2"), help="where the losses (JSON) and the plot go")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process on 127.0.0.1
    import ray

    import paramserver
    from workers.launcher import run_workers

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with paramserver.serve(args.shards, cpus_per_shard=0.01) as service:
            started = time.perf_counter()
            config = {"address": service.address, "steps": args.steps, "warmup": args.warmup,
                      "threads": max(1, (os.cpu_count() or 1) // args.workers)}
            losses = run_workers(train_worker, args.workers, config=config, num_cpus_per_worker=0.01)
            seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    mean = [sum(ls[i] for ls in losses) / len(losses) for i in range(min(map(len, losses)))]
    for i in range(0, len(mean), max(1, len(mean) // 10)):
        print(f"step {i:4d}  loss {mean[i]:.3f}")
    print(f"step {len(mean) - 1:4d}  loss {mean[-1]:.3f}  ({len(mean) / seconds:.2f} steps/s, {args.workers} workers, {args.shards} shards)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "losses.json").write_text(json.dumps({"per_worker": losses, "mean": mean}))
    _plot(mean, args, args.out / "loss.png")
    print(f"plot: {args.out / 'loss.png'}")
    return 0


def _plot(mean: list[float], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(mean, lw=0.8, alpha=0.5, label="loss, mean over workers")
    window = max(1, len(mean) // 20)
    smooth = [sum(mean[max(0, i - window + 1) : i + 1]) / len(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
    ax.plot(smooth, lw=1.5, label=f"smoothed ({window} steps)")
    ax.set(xlabel="step", ylabel="next-byte cross-entropy (nats)",
           title=f"GPT-2 (2 layers, 64 wide), bytes of Python's stdlib sources\n{args.workers} workers, {args.shards} shards, "
                 f"AdamW, warmup {args.warmup} + cosine, clip 1.0; final loss {mean[-1]:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
