"""Errors of the step engine. User errors are ``ValueError`` subclasses; the wire layer maps each to a status."""

from __future__ import annotations


class StepMismatchError(ValueError):
    """A push names a step other than the one now open; ``version`` is the step the server is at."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


class StaleStepError(StepMismatchError):
    """The push is for a step that has already closed."""


class FutureStepError(StepMismatchError):
    """The push is for a step that has not opened yet."""


class NonFiniteGradientError(ValueError):
    """A pushed gradient holds inf or nan and the job's policy is 'error'."""


class NotReadyError(ValueError):
    """The job exists but is not ready for this call yet (its initial weights are not in place)."""


class JobNotFoundError(LookupError):
    """No job of that name on this server."""


class JobExistsError(ValueError):
    """A job of that name exists already, with another configuration."""


class JobFailedError(RuntimeError):
    """A step's update failed part-way, so the shards disagree; the job takes no step until a state is loaded."""
