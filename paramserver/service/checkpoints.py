"""The service's checkpoints: every job restored from ``checkpoint_dir`` at start, a checkpoint every
``checkpoint_every`` steps (at the step boundary, once the step's weights are published: the job is held for the
copy while the workers compute the next step, and background threads write) and on demand (the Checkpoint call)."""

from __future__ import annotations

import logging
from concurrent.futures import Future

from paramserver import checkpoint
from paramserver.core.coordinator import Coordinator, StepResult
from paramserver.service import metrics
from paramserver.service.coordinator_host import CoordinatorHost
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

log = logging.getLogger("paramserver")


class ServiceCheckpoints:
    def __init__(self, host: CoordinatorHost, directory: str, every: int = 0, keep: int = 3) -> None:
        self.host = host
        self.directory = directory
        self.every = every
        self.writer = checkpoint.Checkpointer(directory, keep, on_copy=metrics.record_checkpoint_copy)
        host.checkpoints = self
        host.step_hook = self._stepped

    def restore_all(self) -> list[str]:
        """Restore every job found under the directory at its newest valid checkpoint, on this service's
        shards (the plan is rebuilt for their number). Returns the jobs' names."""
        restored = []
        for name in checkpoint.jobs(self.directory):
            if self.host.has_job(name):
                continue  # taken over from the shards, which are newer
            try:
                part, shards = checkpoint.read_latest(self.directory, name)
            except FileNotFoundError as exc:
                log.error("job %s not restored: %s", name, exc)
                continue
            config = checkpoint.state.config_bytes(part)
            if config is None:
                log.error("job %s not restored: its checkpoint has no job config (not written by a service)", name)
                continue
            job = self.host.add_restored_job(name, pb.JobConfig.FromString(config))
            checkpoint.restore(job.coordinator, part, shards)
            log.info("job %s restored at step %d onto %d shards (saved from %d)", name, part["step"], len(self.host.fleet), len(shards))
            restored.append(name)
        return restored

    def roll_back(self, name: str, coordinator: Coordinator) -> int | None:
        """Load job ``name``'s newest valid checkpoint into its ``coordinator`` (every shard, a new weights
        generation, the job at the checkpoint's step); returns that step, or None when it has none."""
        try:
            part, shards = checkpoint.read_latest(self.directory, name)
        except FileNotFoundError:
            return None
        coordinator.load_state_dict(checkpoint.torch_state(part, shards), step=part["step"])
        coordinator.schedule.applied_steps = part["applied_steps"]
        coordinator.skipped_steps = part["skipped_steps"]
        return part["step"]

    def _stepped(self, name: str, result: StepResult) -> None:
        # on the thread that closed the step, its coordinator's lock held: only the copy happens here
        if self.every and (result.step + 1) % self.every == 0:
            self.save(name)

    def save(self, name: str) -> Future[int]:
        """Checkpoint job ``name`` now; the future holds the step once the checkpoint is valid."""
        job = self.host.job(name)
        return self.writer.save(job.coordinator, name, config=job.config.SerializeToString(), members=set(job.members))

    def close(self) -> None:
        self.writer.close(wait=True)
