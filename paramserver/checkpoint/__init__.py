"""Checkpoints on disk: a job's state written by a background thread in a format a PyTorch user can open
(``torch.save`` files and a JSON manifest, see the README), read back in torch's formats or restored onto any
number of shards. Plain Python and torch: no gRPC, no Ray.
"""

from paramserver.checkpoint.state import load_torch_state, restore, take, torch_state
from paramserver.checkpoint.store import jobs, read_latest, steps
from paramserver.checkpoint.writer import Checkpointer

__all__ = ["Checkpointer", "jobs", "load_torch_state", "read_latest", "restore", "steps", "take", "torch_state"]
