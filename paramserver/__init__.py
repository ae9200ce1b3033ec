"""paramserver: a distributed optimizer service with sharded state.

The engine (``paramserver.core``) is plain Python and torch; the service's pieces (gRPC servers, Ray
hosting) load on first use, so ``import paramserver`` works where gRPC or Ray is not installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from paramserver.core.config import ClipConfig, JobConfig, OptimizerConfig, RayConfig, SchedulerSpec, ServerConfig, TLSConfig
from paramserver.core.coordinator import StepResult
from paramserver.core.engine import StepEngine
from paramserver.core.errors import RolledBackError, StateReloadedError

# name -> module that defines it, imported when the name is first used
_LAZY = {
    "Service": "paramserver.service.server",
    "serve_local": "paramserver.service.local",
    "serve": "paramserver.hosting.serve",
}

__all__ = ["ClipConfig", "JobConfig", "OptimizerConfig", "RayConfig", "SchedulerSpec", "ServerConfig", "TLSConfig", "StepEngine", "StepResult", "StateReloadedError", "RolledBackError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paramserver' has no attribute {name!r}")
