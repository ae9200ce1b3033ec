"""lr lambdas for the parity suite, named by import path ("tests.helpers.lr_lambdas:warmup") from a trusted module."""

from __future__ import annotations


def warmup(epoch: int) -> float:
    """LambdaLR: linear warmup over 5 scheduler steps, then decay."""
    return (epoch + 1) / 5 if epoch < 5 else 0.9 ** (epoch - 4)


def halving(epoch: int) -> float:
    """LambdaLR: halve every 4 scheduler steps."""
    return 0.5 ** (epoch // 4)


def shrink(epoch: int) -> float:
    """MultiplicativeLR: multiply by 0.95 every scheduler step."""
    return 0.95


def every_third(epoch: int) -> float:
    """MultiplicativeLR: multiply by 0.7 on every third scheduler step, else keep."""
    return 0.7 if epoch % 3 == 0 else 1.0


class Warmup:
    """A callable object: LambdaLR's state dict holds its ``__dict__`` (functions are saved as None)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.steps)


warmup_object = Warmup(7)
