"""``StepEngine``: a job and its shards in this process, driven by plain calls (no gRPC, no Ray)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from paramserver.core.config import JobConfig, OptimizerConfig, SchedulerSpec
from paramserver.core.coordinator import Coordinator, StepResult
from paramserver.core.errors import JobFailedError, NonFiniteGradientError
from paramserver.core.job import JobSpec
from paramserver.core.sharding import pack
from paramserver.core.shards import ShardGroup


class StepEngine(Coordinator):
    """A job with its shards in this process: workers call ``push(worker, step, grads, metric)``, the push
    that completes step t runs the rest of the step and returns its ``StepResult``, and ``parameters()``
    then holds the weights of version t+1.

    As with ``torch.optim``, the optimizer and its keyword arguments may follow the params
    (``StepEngine(params, "Adam", lr=1e-3, config=JobConfig(num_workers=2))``), or be in ``config.optimizer``;
    ``scheduler`` likewise fills ``config.scheduler``. ``num_shards`` and ``trusted_modules`` are what a
    server would set (``ServerConfig``).
    """

    def __init__(
        self,
        params: Any,
        optimizer: Any = None,
        *,
        config: JobConfig | None = None,
        num_shards: int = 1,
        trusted_modules: Sequence[str] = (),
        scheduler: SchedulerSpec | None = None,
        device: str | torch.device = "cpu",
        **optimizer_kwargs: Any,
    ) -> None:
        config = config if config is not None else JobConfig()
        if optimizer is not None:
            if config.optimizer != OptimizerConfig():
                raise ValueError("the optimizer is given twice (argument and config.optimizer); give it in one place")
            config = config.replace(optimizer=OptimizerConfig(optimizer, optimizer_kwargs))
        elif optimizer_kwargs:
            raise ValueError(f"optimizer keyword arguments {sorted(optimizer_kwargs)} without an optimizer")
        if scheduler is not None:
            if config.scheduler is not None:
                raise ValueError("the scheduler is given twice (argument and config.scheduler); give it in one place")
            config = config.replace(scheduler=scheduler)
        job = JobSpec.build(params, config, num_shards, trusted_modules)
        super().__init__(job, ShardGroup([job.make_shard(j, device) for j in range(job.plan.num_shards)]))
        self.shard_device = torch.device(device)

    def _grads_in_order(self, grads: Sequence[torch.Tensor] | Mapping[Any, torch.Tensor]) -> list[torch.Tensor]:
        params = self.job.params.params
        if isinstance(grads, Mapping):
            missing = [p.key for p in params if p.key not in grads]
            if missing or len(grads) != len(params):
                raise ValueError(f"gradients must name every parameter once; missing {missing}")
            grads = [grads[p.key] for p in params]
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"expected {len(params)} gradients, got {len(grads)}")
        for p, g in zip(params, grads):
            if g is None:
                continue
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != p.shape:
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"gradient of parameter {p.key!r}: expected shape {p.shape}, got {got}")
            if not g.is_floating_point() and not g.is_complex():
                raise ValueError(f"gradient of parameter {p.key!r}: expected floating point, got {g.dtype}")
        return grads

    def push(
        self,
        worker: int,
        step: int,
        grads: Sequence[torch.Tensor] | Mapping[Any, torch.Tensor],
        metric: float | None = None,
    ) -> StepResult | None:
        """Push one worker's gradients for ``step`` to every shard. Bad input raises ``ValueError`` and changes
        nothing. Returns the step's result if this push completed it, else None (also for a repeated push)."""
        with self._lock:
            self.check_worker(worker)
            if self.policy.asynchronous and step <= self.step:
                if self.failed is not None:
                    raise JobFailedError(self.failed)
            else:
                self.check_step(step)  # asynchronous steps take gradients of older weights, never of future ones
            grads = self._grads_in_order(grads)
            if metric is None and self.schedule.needs_metric:
                raise ValueError("ReduceLROnPlateau needs a metric with every push (step(metric=...))")
            if metric is not None and (isinstance(metric, bool) or not isinstance(metric, (int, float))):
                raise ValueError(f"metric must be a number, got {type(metric).__name__}")
            if self.config.nonfinite == "error" and not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
                raise NonFiniteGradientError(f"gradients of worker {worker} for step {step} hold inf or nan")
            # None: no gradient, as torch's param.grad; a parameter none of the workers has one for is skipped
            missing = [i for i, g in enumerate(grads) if g is None]
            grads = [torch.zeros(p.shape, dtype=p.dtype) if g is None else g for p, g in zip(self.plan.params, grads)]
            applied = [self.shards.push(j, worker, step, pack(self.plan, j, grads, self.shard_device), missing) for j in range(self.plan.num_shards)]
            if not any(applied):
                return None
            if metric is not None:
                self.record_metric(worker, step, metric)
            result = None
            for j in range(self.plan.num_shards):
                shard = self.shards.shards[j]
                ready, _, version, holds = shard.ready_in()
                if ready:
                    result = self.shard_ready(j, version, None, holds, shard.reduce_ahead()) or result
            return result
