"""A table of bad configurations: each raises ValueError with a message that names the problem."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from tests.helpers.reference import make_model


def named():
    return list(make_model().named_parameters())


def engine(params=None, optimizer="Adam", config=None, scheduler=None, **kwargs):
    return ps.StepEngine(named() if params is None else params, optimizer, config=config, scheduler=scheduler, **kwargs)


w = torch.zeros(3, 2, requires_grad=True)

BAD_CONFIGS = [
    ("empty params", lambda: engine(params=[]), "empty parameter list"),
    ("a single tensor", lambda: engine(params=w), "iterable"),
    ("duplicate names", lambda: engine(params=[("w", w), ("w", torch.zeros(2))]), "duplicate parameter name 'w'"),
    ("same tensor twice", lambda: engine(params=[w, w]), "appears twice"),
    ("named and unnamed mixed", lambda: engine(params=[{"params": [("a", w)]}, {"params": [torch.zeros(2)]}]), "all parameters have names"),
    ("integer tensor", lambda: engine(params=[torch.zeros(3, dtype=torch.long)]), "floating point"),
    ("group without params", lambda: engine(params=[{"lr": 0.1}]), "no 'params' key"),
    ("empty group", lambda: engine(params=[{"params": [w]}, {"params": []}]), "empty 'params'"),
    ("unknown optimizer", lambda: engine(optimizer="Adma"), "unknown optimizer 'Adma'; did you mean .*'Adam'"),
    ("bad optimizer kwarg", lambda: engine(lrr=0.1), "bad arguments for optimizer Adam"),
    ("bad optimizer value", lambda: engine(lr=-1.0), "Invalid learning rate"),
    ("bad group option value", lambda: engine(params=[{"params": [w], "betas": (2.0, 0.9)}]), "beta parameter"),
    ("untrusted module", lambda: engine(optimizer="os:system"), "not in trusted_modules"),
    ("bad import path", lambda: engine(optimizer="tests.helpers.reference"), "unknown optimizer"),
    (
        "missing module",
        lambda: engine(optimizer="tests.no_such_module:Opt", trusted_modules=("tests",)),
        "cannot import module 'tests.no_such_module'",
    ),
    (
        "missing class",
        lambda: engine(optimizer="tests.helpers.reference:NoSuch", trusted_modules=("tests",)),
        "has no attribute 'NoSuch'",
    ),
    (
        "not an optimizer",
        lambda: engine(optimizer="tests.helpers.reference:Reference", trusted_modules=("tests",)),
        "not a subclass of torch.optim.optimizer.Optimizer",
    ),
    ("LBFGS", lambda: engine(optimizer="LBFGS"), "needs a closure"),
    ("SparseAdam", lambda: engine(optimizer=torch.optim.SparseAdam), "sparse gradients"),
    ("Muon on a 1-D tensor", lambda: engine(optimizer="Muon"), "2D parameters"),
    ("unknown scheduler", lambda: engine(scheduler=ps.SchedulerSpec("StepLRR")), "did you mean 'StepLR'"),
    ("scheduler missing argument", lambda: engine(scheduler=ps.SchedulerSpec("StepLR")), "bad arguments for scheduler StepLR"),
    ("scheduler bad value", lambda: engine(scheduler=ps.SchedulerSpec("LinearLR", {"start_factor": 5.0})), "LinearLR rejected"),
    ("scheduler given optimizer", lambda: engine(scheduler=ps.SchedulerSpec("StepLR", {"step_size": 1, "optimizer": None})), "do not pass 'optimizer'"),
    ("untrusted lr_lambda", lambda: engine(scheduler=ps.SchedulerSpec("LambdaLR", {"lr_lambda": "math:cos"})), "not in trusted_modules"),
    ("scheduler not a scheduler", lambda: engine(scheduler=ps.SchedulerSpec(torch.optim.Adam)), "not a subclass"),
    ("num_shards 0", lambda: ps.ServerConfig(num_shards=0), "num_shards"),
    ("num_workers 0", lambda: ps.JobConfig(num_workers=0), "num_workers"),
    ("nonfinite policy", lambda: ps.JobConfig(nonfinite="ignore"), "nonfinite"),
    ("split threshold", lambda: ps.JobConfig(split_threshold_bytes=-1), "split_threshold_bytes"),
    ("negative max_norm", lambda: ps.ClipConfig(max_norm=-1.0), "max_norm"),
    ("nan norm_type", lambda: ps.ClipConfig(norm_type=float("nan")), "norm_type"),
    ("negative clip_value", lambda: ps.ClipConfig(clip_value=-0.1), "clip_value"),
    ("scheduler interval 0", lambda: ps.SchedulerSpec("StepLR", {"step_size": 1}, interval=0), "interval"),
]


@pytest.mark.parametrize("build,match", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_it(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_non_elementwise_optimizer_warns_when_it_cannot_split():
    big = [("big", torch.zeros(64, 64)), ("small", torch.zeros(3, 3))]
    with pytest.warns(UserWarning, match="Adafactor is not elementwise"):
        e = ps.StepEngine(big, "Adafactor", num_shards=2, config=ps.JobConfig(split_threshold_bytes=1024))
    assert not e.plan.is_split(0)


def test_torch_optim_names_and_classes_and_paths_resolve_to_the_same_class():
    from paramserver.core.registry import resolve_optimizer

    assert resolve_optimizer("AdamW") is torch.optim.AdamW
    assert resolve_optimizer(torch.optim.AdamW) is torch.optim.AdamW
    assert resolve_optimizer("torch.optim:AdamW", trusted_modules=("torch.optim",)) is torch.optim.AdamW
