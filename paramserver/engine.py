"""The step engine: the one place where the order of a step's stages is written.

    push (shards accumulate) -> aggregate (mean, per-tensor norms) -> clip (total norm, coefficient)
    -> update (each shard's optimizer) -> schedule (the global scheduler) -> broadcast (weights, version t+1)

``StepEngine`` is the coordinator. It talks to its shards through ``ShardGroup``: here the shards are plain
objects in this process; the Ray hosting layer supplies the same calls over actors.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from paramserver import clipping
from paramserver.config import EngineConfig, SchedulerSpec
from paramserver.errors import FutureStepError, JobFailedError, NonFiniteGradientError, StaleStepError
from paramserver.params import ParamGroups, normalize_params
from paramserver.registry import is_elementwise, resolve_optimizer
from paramserver.scheduling import Schedule, build_shadow_optimizer
from paramserver.shard import Shard
from paramserver.sharding import ShardingPlan, make_plan, pack, unpack
from paramserver.state import check_model_state, check_optimizer_state, cut_param_state, join_param_state

log = logging.getLogger("paramserver")


@dataclass(frozen=True)
class StepResult:
    """What became of one closed step."""

    step: int
    total_norm: float
    clip_coef: float | None
    skipped: bool
    lrs: list[float]
    error: str | None = None  # set when the step was refused (non-finite norm with error_if_nonfinite)
    seconds: dict[str, float] = field(default_factory=dict)  # time spent in each stage the coordinator runs


class StageTimer:
    """Adds up the wall time of named stages: ``with timer("clip"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class JobSpec:
    """Everything that defines a job, resolved and validated: the shards and the coordinator are built from it."""

    params: ParamGroups
    optimizer_cls: type
    optimizer_kwargs: dict[str, Any]
    config: EngineConfig
    plan: ShardingPlan
    schedule: Schedule = field(repr=False)

    @classmethod
    def build(
        cls, params: Any, optimizer: Any, config: EngineConfig, scheduler: SchedulerSpec | None, optimizer_kwargs: dict[str, Any]
    ) -> JobSpec:
        groups = normalize_params(params)
        optimizer_cls = resolve_optimizer(optimizer, config.trusted_modules)
        shadow = build_shadow_optimizer(optimizer_cls, groups, optimizer_kwargs)
        schedule = Schedule(shadow, scheduler, config.trusted_modules)
        elementwise = is_elementwise(optimizer_cls)
        threshold = config.split_threshold_bytes
        if not elementwise and threshold is not None and config.num_shards > 1:
            big = [p.key for p in groups.params if p.nbytes > threshold]
            if big:
                warnings.warn(
                    f"{optimizer_cls.__name__} is not elementwise, so tensors {big} above split_threshold_bytes="
                    f"{threshold} stay whole on one shard",
                    stacklevel=3,
                )
        plan = make_plan(groups.params, config.num_shards, threshold, allow_split=elementwise)
        return cls(groups, optimizer_cls, dict(optimizer_kwargs), config, plan, schedule)

    def make_shard(self, shard_id: int, device: str | torch.device = "cpu") -> Shard:
        """Shard ``shard_id`` of this job; built from a description alone (meta tensors) it waits for its
        initial weights (``Shard.load_weights``)."""
        described_only = any(t.is_meta for t in self.params.tensors)
        weights = (
            [torch.zeros(layout.numel, dtype=layout.dtype) for layout in self.plan.buffers(shard_id)]
            if described_only
            else pack(self.plan, shard_id, self.params.tensors)
        )
        return Shard(
            shard_id,
            self.plan,
            weights,
            self.optimizer_cls,
            self.params.group_options,
            self.optimizer_kwargs,
            num_workers=self.config.num_workers,
            deterministic=self.config.deterministic,
            reject_nonfinite=self.config.nonfinite == "error",
            device=device,
            initialized=not described_only,
        )


class ShardGroup:
    """The coordinator's view of a job's shards, here plain ``Shard`` objects in this process.

    Every call goes through ``_all`` (the same call on every shard) or ``_each`` (one argument list per
    shard); ``paramserver.hosting.RayShardGroup`` sends the same calls to shard actors in parallel.
    """

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)

    def _all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.shards]

    def _each(self, method: str, args_per_shard: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [getattr(s, method)(*args) for s, args in zip(self.shards, args_per_shard, strict=True)]

    # used by the in-process StepEngine only
    def push(self, shard: int, worker: int, step: int, grads: Sequence[torch.Tensor], missing: Sequence[int] = ()) -> bool:
        return self.shards[shard].push(worker, step, grads, missing)

    def all_ready(self) -> bool:
        return all(s.ready for s in self.shards)

    def reduce(self, step: int, norm_type: float, clip_value: float | None) -> list[list[torch.Tensor]]:
        return self._all("reduce", step, norm_type, clip_value)

    def apply(self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]]) -> None:
        self._all("apply", step, clip_coef, hyperparameters)

    def skip(self, step: int) -> None:
        self._all("skip", step)

    def weights(self) -> list[list[torch.Tensor]]:
        return self._all("weight_copies")

    def load_weights(self, buffers: Sequence[Sequence[torch.Tensor]]) -> None:
        self._each("load_weights", [(b,) for b in buffers])

    def optimizer_states(self) -> list[list[dict[str, Any]]]:
        return self._all("optimizer_state")  # live state: the caller copies (state.join_param_state)

    def load_optimizer_states(self, states: Sequence[Sequence[dict[str, Any]]], param_groups: list[dict[str, Any]]) -> None:
        self._each("load_optimizer_state", [(st, param_groups) for st in states])

    def statuses(self) -> list[dict[str, Any]]:
        return self._all("status")

    def wait_initialized(self, timeout: float) -> None:
        self._all("wait_for_version", 0, timeout)


class Coordinator:
    """Coordinates one job's synchronous steps over its shards.

    Shards receive the pushes; each tells the coordinator when it holds all W workers' gradients for the
    open step (``shard_ready``), and the call that completes the set runs the rest of the step.
    """

    def __init__(self, job: JobSpec, shards: ShardGroup) -> None:
        self.job = job
        self.config = job.config
        self.plan = job.plan
        self.schedule = job.schedule
        self.shards = shards
        self.version = 0
        self.skipped_steps = 0
        self.last_result: StepResult | None = None
        self._metrics: dict[int, dict[int, float]] = {}  # step -> worker -> metric
        self._ready: dict[int, set[int]] = {}  # step -> shards holding all gradients
        self.on_step: Callable[[StepResult], None] | None = None  # told of every closed step (metrics, logs)
        self.failed: str | None = None  # set when an update failed part-way; cleared by load_state_dict
        self._lock = threading.RLock()

    def check_worker(self, worker: int) -> None:
        if not isinstance(worker, int) or isinstance(worker, bool) or not 0 <= worker < self.config.num_workers:
            raise ValueError(f"worker must be in [0, {self.config.num_workers}), got {worker!r}")

    def check_step(self, step: int) -> None:
        if self.failed is not None:
            raise JobFailedError(self.failed)
        if step < self.version:
            raise StaleStepError(f"step {step} has already closed (now at {self.version})", self.version)
        if step > self.version:
            raise FutureStepError(f"step {step} is not open yet (now at {self.version})", self.version)

    def record_metric(self, worker: int, step: int, metric: float) -> None:
        """A worker's metric for ``step`` (ReduceLROnPlateau steps on the workers' mean)."""
        if isinstance(metric, bool) or not isinstance(metric, (int, float)):
            raise ValueError(f"metric must be a number, got {type(metric).__name__}")
        with self._lock:
            self.check_worker(worker)
            self.check_step(step)
            self._metrics.setdefault(step, {})[worker] = float(metric)

    def shard_ready(self, shard: int, step: int) -> StepResult | None:
        """Shard ``shard`` holds every worker's gradients for ``step``; the last shard to say so closes it."""
        with self._lock:
            self.check_step(step)
            ready = self._ready.setdefault(step, set())
            ready.add(shard)
            if len(ready) < self.plan.num_shards:
                return None
            del self._ready[step]
            return self._close_step(step)

    # -- the order of the stages ------------------------------------------------------------------------------

    def _close_step(self, step: int) -> StepResult:
        clip = self.config.clip
        timer = StageTimer()
        with timer("aggregate"):
            norms = self.shards.reduce(step, clip.norm_type, clip.clip_value)
        with timer("clip"):
            total = self._total_norm(norms)
        metrics = self._metrics.pop(step, {})
        metric = sum(metrics[w] for w in sorted(metrics)) / len(metrics) if metrics else None
        if not clipping.is_finite(total):
            error = None
            if clip.error_if_nonfinite:
                error = (
                    f"The total norm of order {clip.norm_type} for gradients is non-finite, so it cannot be clipped; "
                    "the step was skipped"
                )
            with timer("update"):
                self.shards.skip(step)
            self.skipped_steps += 1
            return self._closed(StepResult(step, float(total), None, True, self.schedule.lrs(), error, timer.seconds))
        with timer("clip"):
            coef = clipping.clip_coefficient(total, clip.max_norm) if clip.max_norm is not None else None
        with timer("update"):
            try:
                self.shards.apply(step, coef, self.schedule.hyperparameters())
            except Exception as exc:
                # Some shards may have updated and others not: no step can follow from that state.
                self.failed = f"the update of step {step} failed ({type(exc).__name__}: {exc}); load a saved state to go on"
                log.error("%s", self.failed)
                raise
        error = None
        with timer("schedule"):
            try:
                self.schedule.after_update(metric)
            except Exception as exc:  # the update happened: the step closes, the scheduler's error is reported
                error = f"the scheduler did not step after step {step}: {type(exc).__name__}: {exc}"
                log.error("%s", error)
        return self._closed(
            StepResult(step, float(total), None if coef is None else float(coef), False, self.schedule.lrs(), error, timer.seconds)
        )

    def _closed(self, result: StepResult) -> StepResult:
        self.version += 1  # broadcast: pulls for version t+1 may now be served
        self.last_result = result
        if self.on_step is not None:
            self.on_step(result)
        return result

    def _total_norm(self, norms_per_shard: list[list[torch.Tensor | None]]) -> torch.Tensor:
        """The total norm over the parameters that have a gradient (a shard reports None for the others)."""
        pieces: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for shard, norms in zip(self.plan.shards, norms_per_shard, strict=True):
            for s, n in zip(shard, norms, strict=True):
                if n is not None:
                    pieces.setdefault(s.param, []).append((s.start, n))
        norm_type = self.config.clip.norm_type
        present = [p for p in self.plan.params if p.index in pieces]
        per_param = [clipping.combine_piece_norms([n for _, n in sorted(pieces[p.index], key=lambda x: x[0])], norm_type) for p in present]
        return clipping.total_norm(per_param, [p.dtype for p in present], norm_type)

    # -- broadcast --------------------------------------------------------------------------------------------

    def parameters(self) -> list[torch.Tensor]:
        """The current weights, one new tensor per parameter, in index order."""
        out = [torch.empty(p.shape, dtype=p.dtype) for p in self.plan.params]
        for j, buffers in enumerate(self.shards.weights()):
            unpack(self.plan, j, buffers, out)
        return out

    def get_last_lr(self) -> list[float]:
        return self.schedule.lrs()

    # -- state in torch's formats -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            params = self.plan.params
            model = {p.key: t for p, t in zip(params, self.parameters())}
            shard_states = self.shards.optimizer_states()
            state: dict[int, dict[str, Any]] = {}
            for p in params:
                pieces = []
                for j, s in self.plan.pieces(p.index):
                    pieces.append((s, shard_states[j][self.plan.shards[j].index(s)]))
                if any(st for _, st in pieces):
                    state[p.index] = join_param_state(self.plan, p, pieces)
            groups = self.schedule.optimizer.state_dict()["param_groups"]
            optimizer = {"state": state, "param_groups": copy.deepcopy(groups)}
            return {"model": model, "optimizer": optimizer, "scheduler": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load any of "model", "optimizer", "scheduler" in torch's formats; everything is checked before
        anything changes."""
        unknown = set(state_dict) - {"model", "optimizer", "scheduler"}
        if unknown:
            raise ValueError(f"unknown state dict keys {sorted(unknown)}; expected 'model', 'optimizer', 'scheduler'")
        with self._lock:
            params = self.plan.params
            weights = None
            if "model" in state_dict:
                tensors = check_model_state(params, state_dict["model"])
                weights = [pack(self.plan, j, tensors) for j in range(self.plan.num_shards)]
            shard_states = None
            if "optimizer" in state_dict:
                sd = state_dict["optimizer"]
                check_optimizer_state(params, len(self.job.params.group_options), sd)
                # torch maps saved ids to parameters by position across the groups
                saved_ids = [i for group in sd["param_groups"] for i in group["params"]]
                by_index = {pos: sd["state"].get(saved_id, {}) for pos, saved_id in enumerate(saved_ids)}
                shard_states = [
                    [cut_param_state(params[s.param], s, self.plan.is_whole(s), by_index[s.param]) for s in slices]
                    for slices in self.plan.shards
                ]
                self._check_state_shapes(by_index)
            if "scheduler" in state_dict:
                self.schedule.load_state_dict(state_dict["scheduler"])
            if shard_states is not None:
                sd = state_dict["optimizer"]
                self.schedule.optimizer.load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
                self.shards.load_optimizer_states(shard_states, self.schedule.hyperparameters())
            if weights is not None:
                self.shards.load_weights(weights)
            if weights is not None and shard_states is not None:
                self.failed = None  # every shard holds the same, complete state again

    def _check_state_shapes(self, by_index: Mapping[int, Mapping[str, Any]]) -> None:
        elementwise = is_elementwise(self.job.optimizer_cls)
        for p in self.plan.params:
            if not (elementwise or self.plan.is_split(p.index)):
                continue
            for key, value in by_index[p.index].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != p.shape:
                    raise ValueError(f"optimizer state {key!r} of parameter {p.key!r} has shape {tuple(value.shape)}, expected {p.shape}")


class StepEngine(Coordinator):
    """A job with its shards in this process: workers call ``push(worker, step, grads, metric)``, the push
    that completes step t runs the rest of the step and returns its ``StepResult``, and ``parameters()``
    then holds the weights of version t+1."""

    def __init__(
        self,
        params: Any,
        optimizer: Any,
        *,
        config: EngineConfig | None = None,
        scheduler: SchedulerSpec | None = None,
        device: str | torch.device = "cpu",
        **optimizer_kwargs: Any,
    ) -> None:
        job = JobSpec.build(params, optimizer, config or EngineConfig(), scheduler, optimizer_kwargs)
        super().__init__(job, ShardGroup([job.make_shard(j, device) for j in range(job.plan.num_shards)]))

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
            self.check_step(step)
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
            applied = [self.shards.push(j, worker, step, pack(self.plan, j, grads), missing) for j in range(self.plan.num_shards)]
            if not any(applied):
                return None
            if metric is not None:
                self.record_metric(worker, step, metric)
            result = None
            for j in range(self.plan.num_shards):
                if self.shards.shards[j].ready:
                    result = self.shard_ready(j, step)
            return result
