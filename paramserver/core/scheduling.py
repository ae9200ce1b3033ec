"""Schedule: the LR scheduler, run once for the whole job over a shadow optimizer.

The shadow is an instance of the job's optimizer class with the job's param groups over ``meta`` tensors
(shapes, no storage), so any ``torch.optim.lr_scheduler`` works on it unchanged and its param groups hold
the hyperparameters of every group for the next step: lr, and momentum or betas where a scheduler cycles
them. The shards copy those hyperparameters before each update. The shadow's groups are also the
``param_groups`` of the exported optimizer state dict.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import lr_scheduler

from paramserver.core.config import SchedulerSpec
from paramserver.core.params import ParamGroups
from paramserver.core.registry import resolve_callable, resolve_scheduler

NOT_HYPERPARAMETERS = ("params", "param_names")


def build_optimizer(optimizer_cls: type, groups: list[dict[str, Any]], optimizer_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """Construct ``optimizer_cls`` over ``groups``; a bad kwarg or value becomes a ``ValueError`` naming it."""
    try:
        return optimizer_cls(groups, **copy.deepcopy(optimizer_kwargs))
    except TypeError as exc:
        raise ValueError(f"bad arguments for optimizer {optimizer_cls.__name__}: {exc}") from exc
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"optimizer {optimizer_cls.__name__} rejected its configuration: {exc}") from exc


def build_shadow_optimizer(optimizer_cls: type, params: ParamGroups, optimizer_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    accepted = inspect.signature(optimizer_cls.__init__).parameters
    groups = []
    for g, options in enumerate(params.group_options):
        members = params.group_members(g)
        metas = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in members]
        # torch checks hyperparameter values only in the constructor: check each group's own values there too.
        group_kwargs = {k: v for k, v in options.items() if k in accepted}
        if group_kwargs:
            try:
                build_optimizer(optimizer_cls, [metas[0]], {**optimizer_kwargs, **group_kwargs})
            except ValueError as exc:
                raise ValueError(f"param group {g}: {exc}") from exc
        group_params = [(p.name, t) for p, t in zip(members, metas)] if params.named else metas
        groups.append({"params": group_params, **copy.deepcopy(options)})
    return build_optimizer(optimizer_cls, groups, optimizer_kwargs)


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k not in NOT_HYPERPARAMETERS} for g in optimizer.param_groups]


def set_hyperparameters(optimizer: torch.optim.Optimizer, values: list[dict[str, Any]]) -> None:
    """Give ``optimizer``'s groups these hyperparameters; a tensor-valued one (lr as a Tensor) is filled in
    place, as torch's schedulers do, so the optimizer's kernels see the same types as locally."""
    assert len(values) == len(optimizer.param_groups)
    for group, new in zip(optimizer.param_groups, values):
        for key, value in new.items():
            current = group.get(key)
            if isinstance(current, torch.Tensor):
                current.copy_(value) if isinstance(value, torch.Tensor) else current.fill_(value)
            else:
                group[key] = value.clone() if isinstance(value, torch.Tensor) else value


def _build_scheduler(spec: Any, optimizer: torch.optim.Optimizer, trusted_modules: Iterable[str]) -> lr_scheduler.LRScheduler:
    if not isinstance(spec, SchedulerSpec):
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            spec = SchedulerSpec(spec[0], dict(spec[1]))
        else:
            spec = SchedulerSpec(spec)
    cls = resolve_scheduler(spec.scheduler, trusted_modules)
    kwargs = dict(spec.kwargs)
    if "lr_lambda" in kwargs:
        fns = kwargs["lr_lambda"]
        kwargs["lr_lambda"] = (
            [resolve_callable(f, trusted_modules, "lr_lambda") for f in fns]
            if isinstance(fns, (list, tuple))
            else resolve_callable(fns, trusted_modules, "lr_lambda")
        )
    if "schedulers" in kwargs:
        kwargs["schedulers"] = [_build_scheduler(s, optimizer, trusted_modules) for s in kwargs["schedulers"]]
    if "optimizer" in kwargs:
        raise ValueError(f"scheduler {cls.__name__}: do not pass 'optimizer'; the service supplies it")
    try:
        return cls(optimizer=optimizer, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for scheduler {cls.__name__}: {exc}") from exc
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"scheduler {cls.__name__} rejected its configuration: {exc}") from exc


class Schedule:
    """The shadow optimizer and the job's scheduler; steps the scheduler every ``interval`` applied steps."""

    def __init__(
        self,
        shadow: torch.optim.Optimizer,
        spec: SchedulerSpec | None,
        trusted_modules: Iterable[str] = (),
    ) -> None:
        self.optimizer = shadow
        self.scheduler = _build_scheduler(spec, shadow, trusted_modules) if spec is not None else None
        self.interval = spec.interval if spec is not None else 1
        self.applied_steps = 0
        self._metrics: list[float] = []

    @property
    def needs_metric(self) -> bool:
        return isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau)

    def hyperparameters(self) -> list[dict[str, Any]]:
        """Every group's hyperparameters for the coming update."""
        return hyperparameters(self.optimizer)

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def after_update(self, metric: float | None) -> None:
        """Count an applied update and step the scheduler when its interval is complete.

        ReduceLROnPlateau gets the mean of the metrics reported over the interval.
        """
        self.applied_steps += 1
        if metric is not None:
            self._metrics.append(metric)
        if self.scheduler is None or self.applied_steps % self.interval:
            return
        # The update ran on the shards, not on the shadow: tell the scheduler that it did, so it does not
        # warn that it steps before the optimizer.
        self.optimizer._opt_called = True  # type: ignore[attr-defined]
        if self.needs_metric:
            if not self._metrics:
                raise ValueError("ReduceLROnPlateau needs the workers' metric (step(metric=...)); none came with this interval")
            self.scheduler.step(sum(self._metrics) / len(self._metrics))
        else:
            self.scheduler.step()
        self._metrics.clear()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def snapshot(self) -> dict[str, Any]:
        """All of this schedule's state, copied: a coordinator that restarts goes on from it (``resume``)."""
        return {
            "scheduler": copy.deepcopy(self.state_dict()), "hyperparameters": copy.deepcopy(self.hyperparameters()),
            "applied_steps": self.applied_steps, "metrics": list(self._metrics),
        }

    def resume(self, snapshot: dict[str, Any]) -> None:
        """Take the state of a ``snapshot()``."""
        self.load_state_dict(snapshot["scheduler"])
        set_hyperparameters(self.optimizer, copy.deepcopy(snapshot["hyperparameters"]))
        self.applied_steps = snapshot["applied_steps"]
        self._metrics = list(snapshot["metrics"])

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scheduler is None:
            if state is not None:
                raise ValueError("this job has no scheduler, but a scheduler state was given")
            return
        if not isinstance(state, dict):
            raise ValueError("this job has a scheduler; its state must be a dict from scheduler.state_dict()")
        before = copy.deepcopy(self.scheduler.state_dict())
        try:
            self.scheduler.load_state_dict(copy.deepcopy(state))
        except Exception as exc:
            self.scheduler.load_state_dict(before)  # torch may have taken part of the state: undo it
            raise ValueError(f"scheduler state does not fit {type(self.scheduler).__name__}: {type(exc).__name__}: {exc}") from exc
