"""A straggler run: the digits job with 4 workers, one of them slower by a sleep, under each step policy.

Every policy trains the same job (``workers/demos/train.py``'s model and data, Adam, constant learning rate) on
a fresh service in this process (``serve_local(2)``), with its 4 workers as threads of this process; each
worker trains on its quarter of every batch, and worker ``SLOW_RANK`` sleeps after each backward so that its
steps take about ``slow_factor`` times a normal step (the sleep is sized by a calibration run of the same job
without a straggler). Every ``eval_every`` steps rank 0 (a fast worker, whose model holds the job's latest
weights after its ``step()``) measures the test accuracy; the run stops when it reaches ``target`` or at a cap
of steps or seconds (then the time to the target is ``inf``: not reached).

    python -c "from benchmarks.straggler import straggler_run; print(straggler_run())"

A policy is one entry of ``POLICIES``: its name and the ``RemoteOptimizer`` keywords that select it: sync,
backup workers, bounded staleness (SSP) and asynchronous training.
"""

from __future__ import annotations

import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paramserver.service.local import serve_local
from workers.demos.train import accuracy, load_digits_split, make_model
from workers.remote_optimizer import RemoteOptimizer

NUM_WORKERS = 4
SLOW_RANK = NUM_WORKERS - 1

# name -> the RemoteOptimizer keywords of that step policy. To come (issue 10), when the modes are built:
#   "ssp (max_staleness=2)": {"mode": "async", "max_staleness": 2},
#   "async": {"mode": "async"},
POLICIES: dict[str, dict[str, Any]] = {
    "sync": {},
    "backup (close_after=3)": {"close_after": 3},
    "ssp (max_staleness=2)": {"mode": "async", "max_staleness": 2},
    "async": {"mode": "async"},
}


def target_rows(result: dict[str, Any]) -> list[tuple[str, float, str, str | None, float | None]]:
    """``straggler_run``'s result as benchmark rows ``(name, value, unit, baseline, baseline value)``: per policy
    the median seconds to the target and the steps to it, each against sync's (the baseline): a ratio below 1 is
    sooner than sync, and sync's seconds over a policy's (1 / ratio) is its speed-up."""
    pct = round(result["target"] * 100)
    base = next(iter(result["seconds_to_target"]))  # the first policy, sync
    rows = []
    for name, seconds in result["seconds_to_target"].items():
        word = row_name(name)
        is_base = name == base
        rows.append((f"straggler_{word}_s_to_{pct}", seconds, "s", None if is_base else f"straggler_{row_name(base)}_s_to_{pct}",
                     None if is_base else result["seconds_to_target"][base]))
    for name, steps in result["steps_to_target"].items():
        word = row_name(name)
        is_base = name == base
        rows.append((f"straggler_{word}_steps_to_{pct}", steps, "steps", None if is_base else f"straggler_{row_name(base)}_steps_to_{pct}",
                     None if is_base else result["steps_to_target"][base]))
    return rows


def row_name(policy: str) -> str:
    """``sync`` -> ``sync``, ``backup (close_after=3)`` -> ``backup``: the word used in the row names."""
    return policy.split()[0]


@dataclass
class PolicyRun:
    policy: str
    seconds_to_target: float  # inf: not reached within the caps
    steps_to_target: int | None
    steps: int  # the job's steps when the run stopped
    seconds: float
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds since start, step, accuracy)
    slow_worker_steps: int = 0  # the straggler's step() calls
    slow_worker_contributed: int = 0  # ... of which its gradient was applied (its step_count moved by one)
    errors: list[str] = field(default_factory=list)


def _run_policy(
    policy_kwargs: dict[str, Any],
    *,
    slow_sleep_s: float,
    target: float,
    max_steps: int,
    max_seconds: float,
    eval_every: int,
    batch_size: int,
    lr: float,
    seed: int,
    job: str,
    num_workers: int = NUM_WORKERS,
) -> PolicyRun:
    """One policy's run on a fresh service; every wait has a deadline."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    steps_per_epoch = len(x_train) // batch_size
    stop = threading.Event()
    curve: list[tuple[float, int, float]] = []
    errors: list[str] = []
    state: dict[str, Any] = {"start": None, "steps": 0, "slow_steps": 0, "slow_applied": 0}
    # the clock starts when every worker has joined (and before any of them steps)
    ready = threading.Barrier(num_workers + 1, action=lambda: state.update(start=time.perf_counter()), timeout=60)

    init = threading.Lock()  # torch's global generator is shared by the threads

    def worker(rank: int, address: str) -> None:
        with init:  # every rank builds the same model; rank 0's weights are the job's initial weights
            torch.manual_seed(seed)
            model = make_model()
        loss_fn = nn.CrossEntropyLoss()
        opt = None
        try:
            opt = RemoteOptimizer(
                model.named_parameters(), "Adam", lr=lr, weight_decay=1e-4, address=address, job=job, rank=rank,
                num_workers=num_workers, clip_grad_norm=1.0, timeout=30.0, join_timeout=30.0, **policy_kwargs,
            )
            ready.wait()
            while not stop.is_set():
                step = opt.step_count
                epoch, b = divmod(step, steps_per_epoch)
                order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + epoch))
                idx = order[b * batch_size : (b + 1) * batch_size][rank::num_workers]  # this worker's quarter
                opt.zero_grad()
                loss_fn(model(x_train[idx]), y_train[idx]).backward()
                if rank == SLOW_RANK and slow_sleep_s > 0:
                    time.sleep(slow_sleep_s)
                if stop.is_set():
                    break
                opt.step()
                if rank == SLOW_RANK:
                    state["slow_steps"] += 1
                    state["slow_applied"] += opt.step_count == step + 1
                if rank == 0:
                    now = time.perf_counter() - state["start"]
                    state["steps"] = opt.step_count
                    if opt.step_count >= state.setdefault("next_eval", eval_every):  # async steps may jump past it
                        state["next_eval"] = (opt.step_count // eval_every + 1) * eval_every
                        curve.append((now, opt.step_count, accuracy(model, x_test, y_test)))
                        if curve[-1][2] >= target:
                            stop.set()
                    if opt.step_count >= max_steps or now >= max_seconds:
                        stop.set()
        except threading.BrokenBarrierError:
            errors.append(f"rank {rank}: the workers did not all join in time")
        except Exception as exc:  # noqa: BLE001 - reported in the result, not raised from a thread
            if not stop.is_set():
                errors.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        finally:
            stop.set()  # one worker's end ends the run: the others leave too
            if opt is not None:
                opt.close()  # leaves the job: the others' open step no longer waits for this worker

    threads: list[threading.Thread] = []
    service = serve_local(2)
    try:
        threads = [threading.Thread(target=worker, args=(r, service.address), daemon=True, name=f"straggler-{r}") for r in range(num_workers)]
        for t in threads:
            t.start()
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            errors.append("the workers did not all join in time")
            stop.set()
        stop.wait(timeout=max_seconds + 30)
        stop.set()
        seconds = time.perf_counter() - (state["start"] or time.perf_counter())
        for t in threads:
            t.join(timeout=45)
        errors += [f"{t.name} still running after the run" for t in threads if t.is_alive()]
    finally:
        service.shutdown()
    reached = next(((t, s) for t, s, a in curve if a >= target), None)
    return PolicyRun(
        policy="", seconds_to_target=reached[0] if reached else math.inf, steps_to_target=reached[1] if reached else None,
        steps=state["steps"], seconds=seconds, curve=curve, slow_worker_steps=state["slow_steps"],
        slow_worker_contributed=state["slow_applied"], errors=errors,
    )


def calibrate_step_s(steps: int = 30, *, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> float:
    """Seconds of one step of the same job with no straggler (sync, 4 workers, no evaluation): the mean over
    ``steps`` after the first few."""
    run = _run_policy(
        {}, slow_sleep_s=0.0, target=2.0, max_steps=steps, max_seconds=60, eval_every=max(1, steps // 3),
        batch_size=batch_size, lr=lr, seed=seed, job="straggler-calibrate",
    )
    if run.errors or run.steps < 2 or not run.curve:
        raise RuntimeError(f"calibration run failed: {run.errors or 'no steps'}")
    (t0, s0, _), (t1, s1, _) = run.curve[0], run.curve[-1]
    return (t1 - t0) / (s1 - s0) if s1 > s0 else run.seconds / max(run.steps, 1)


def straggler_run(
    quick: bool = False,
    *,
    policies: dict[str, dict[str, Any]] | None = None,
    repeats: int | None = None,
    slow_factor: float = 3.0,
    target: float = 0.95,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    eval_every: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    plot_path: Path | None = Path("runs/straggler.png"),
) -> dict[str, Any]:
    """Every policy of ``policies`` (default: ``POLICIES``), ``repeats`` times each, interleaved (policy after
    policy, then again), with the straggler's sleep sized by one calibration run: ``(slow_factor - 1) x`` a
    normal step. Returns the normal step's time, the sleep, each policy's runs, the median seconds and steps to
    the target by policy (``inf`` when the median run did not reach it) and the plot's path (None when it was
    not drawn)."""
    policies = POLICIES if policies is None else policies
    repeats = repeats if repeats is not None else (1 if quick else 3)
    max_steps = max_steps if max_steps is not None else (300 if quick else 600)
    max_seconds = max_seconds if max_seconds is not None else (30.0 if quick else 180.0)
    step_s = calibrate_step_s(10 if quick else 30, batch_size=batch_size, lr=lr, seed=seed)
    slow_sleep_s = (slow_factor - 1) * step_s
    runs: dict[str, list[PolicyRun]] = {name: [] for name in policies}
    for i in range(repeats):
        for name, kwargs in policies.items():
            print(f"... straggler: {name} ({i + 1}/{repeats})", file=sys.stderr, flush=True)
            run = _run_policy(
                kwargs, slow_sleep_s=slow_sleep_s, target=target, max_steps=max_steps, max_seconds=max_seconds,
                eval_every=eval_every, batch_size=batch_size, lr=lr, seed=seed, job=f"straggler-{row_name(name)}-{i}",
            )
            run.policy = name
            runs[name].append(run)
    seconds = {name: statistics.median(r.seconds_to_target for r in rs) for name, rs in runs.items()}
    steps = {name: statistics.median(math.inf if r.steps_to_target is None else r.steps_to_target for r in rs) for name, rs in runs.items()}
    drawn = plot(runs, target, plot_path) if plot_path is not None else None
    return {
        "step_s": step_s, "slow_sleep_s": slow_sleep_s, "target": target, "repeats": repeats, "runs": runs,
        "seconds_to_target": seconds, "steps_to_target": steps, "plot": drawn,
    }


def plot(runs: dict[str, list[PolicyRun]], target: float, path: Path) -> Path | None:
    """Test accuracy against wall time, one colour per policy and one line per repeat; None (and a message)
    without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("straggler: matplotlib is not installed, no plot", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, rs) in enumerate(runs.items()):
        median = statistics.median(r.seconds_to_target for r in rs)
        label = f"{name}: {median:.1f} s to {target:.0%}" if math.isfinite(median) else f"{name}: {target:.0%} not reached"
        for i, run in enumerate(r for r in rs if r.curve):
            t, _, acc = zip(*run.curve)
            ax.plot(t, acc, color=f"C{k}", marker=".", lw=1, alpha=0.8, label=label if i == 0 else None)
    ax.axhline(target, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy (rank 0)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"digits, {NUM_WORKERS} workers, worker {SLOW_RANK} slowed by a sleep")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
