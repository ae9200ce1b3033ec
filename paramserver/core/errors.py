"""Every error the service raises on purpose, as plain Python classes (no gRPC here).

Each stays a subclass of the builtin it was before (``ValueError``, ``LookupError``, ...), so callers that
catch the builtin keep working. ``paramserver.wire.errors`` maps each class to a gRPC status code and a
reason string, and the client rebuilds the same class from that reason.
"""

from __future__ import annotations


class StepMismatchError(ValueError):
    """A push names a step other than the one now open; ``version`` is the step the server is at."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # pickles (Ray) with its version
        return type(self), (str(self), self.version)


class StaleStepError(StepMismatchError):
    """The push is for a step that has already closed."""


class FutureStepError(StepMismatchError):
    """The push is for a step that has not opened yet."""


class StateReloadedError(StepMismatchError):
    """A state was loaded since the weights this call was made from (a new weights generation): a push
    computed on them is refused. ``version`` (also ``step``) is the loaded step, the step to resume from;
    ``RemoteOptimizer.step()`` raises it once the model holds that step's weights."""

    @property
    def step(self) -> int:
        return self.version


class RolledBackError(StateReloadedError):
    """A shard of the job died (``replicas=0``) and the job rolled back to its newest checkpoint: every shard
    holds the checkpoint's state again, in a new weights generation, at step ``step`` (= ``version``).
    ``RemoteOptimizer.step()`` raises it once the model holds that step's weights and ``step_count == step``;
    go on from ``step`` with the same data. A subclass of ``StateReloadedError``: a loop that catches that
    one goes on exactly too."""


class NonFiniteGradientError(ValueError):
    """A pushed gradient holds inf or nan and the job's policy is 'error'."""


class NotReadyError(ValueError):
    """The job exists but is not ready for this call yet (its initial weights are not in place)."""


class JobNotFoundError(LookupError):
    """No job of that name on this server."""


class JobExistsError(ValueError):
    """A job of that name exists already, with another configuration."""


class JobFinishedError(ValueError):
    """The job of that name has finished (every worker left after it trained): creating it again does not
    silently continue it. Delete it (``paramserver delete --job NAME``) to start anew under its name, or join it
    as rank 0 to continue it (then the other ranks may join again)."""


class JobFailedError(RuntimeError):
    """A step's update failed part-way, so the shards disagree; the job takes no step until a state is loaded."""


class ShardLostError(ConnectionError):
    """A shard's process died while the coordinator called it (and no standby answered in its place): the step
    stays open, and closes once the shard is back (a standby took over) and holds the step's pushes again."""

    def __init__(self, message: str, shard: int | None = None) -> None:
        super().__init__(message)
        self.shard = shard  # None when it came over the wire

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:  # pickles (Ray) with its shard
        return type(self), (str(self), self.shard)


class NotAMemberError(LookupError):
    """The worker is not a member of the job (its lease expired, it left, or it never joined): its pushes are
    refused; it may join again."""


class WrongServiceError(ValueError):
    """A call (Stop) names another service instance than this one: the id ``GetServiceInfo`` reports changes
    with every start of the service, so a stop meant for an earlier or another service stops nothing."""


class DeadlineExceededError(TimeoutError):
    """A wait ran out: on the server (for a version, a job, initial weights) or the call's own deadline."""


class UnauthenticatedError(PermissionError):
    """The call lacks the right bearer token."""


class InternalError(RuntimeError):
    """The server failed in a way it did not expect (a bug); its log has the traceback."""
