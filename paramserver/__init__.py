"""paramserver: a distributed optimizer service with sharded state."""

from paramserver.config import ClipConfig, EngineConfig, SchedulerSpec
from paramserver.engine import StepEngine, StepResult
from paramserver.server import Service, TLSConfig, serve

__all__ = ["ClipConfig", "EngineConfig", "SchedulerSpec", "Service", "StepEngine", "StepResult", "TLSConfig", "serve"]
__version__ = "0.1.0"
