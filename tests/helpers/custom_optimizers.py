"""User-defined optimizers for the parity suite, named by import path ("tests.helpers.custom_optimizers:Class")
from a server whose ``trusted_modules`` include "tests"."""

from __future__ import annotations

import os
import time

import torch


class ReplacingSGD(torch.optim.Optimizer):
    """The classic hand-written SGD that replaces each parameter's tensor instead of updating it in place."""

    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = p.data - group["lr"] * p.grad
        return None


class InPlaceMomentum(torch.optim.Optimizer):
    """Heavy-ball momentum written by hand, updating weights and its state in place; keeps a step count."""

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = p.grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                state["step"] += 1
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return None


class PausingAdam(torch.optim.Adam):
    """Adam that, before its ``pause_at``-th update, writes a file named by its process id into ``marker_dir``
    and sleeps ``pause_s``: a fault test kills a shard's process in the middle of its update. Otherwise Adam."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), marker_dir: str = "", pause_at: int = -1, pause_s: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=tuple(betas))
        self._pause = (marker_dir, pause_at, pause_s)
        self._updates = 0

    def step(self, closure=None):
        self._updates += 1
        marker_dir, pause_at, pause_s = self._pause
        if marker_dir and self._updates == pause_at:
            with open(os.path.join(marker_dir, str(os.getpid())), "w"):
                pass
            time.sleep(pause_s)
        return super().step(closure)
