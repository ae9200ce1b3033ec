"""paramserver: a distributed optimizer service with sharded state."""

from paramserver.config import ClipConfig, EngineConfig, SchedulerSpec
from paramserver.engine import StepEngine, StepResult

__all__ = ["ClipConfig", "EngineConfig", "SchedulerSpec", "StepEngine", "StepResult"]
__version__ = "0.1.0"
