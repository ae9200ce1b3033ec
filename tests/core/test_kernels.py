"""The shard's kernel choice: foreach where it gives torch's default bits, the user's choice kept everywhere else
(and in the job's state). The bits themselves are checked by the parity suite against local torch.optim."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.core.kernels import kernel_choice
from tests.helpers.custom_optimizers import InPlaceMomentum

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("optimizer", "kwargs", "groups", "device", "expected"),
    [
        (torch.optim.Adam, {"lr": 1e-3}, [{}], CPU, {"foreach": True}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, [{}, {"lr": 0.01}], CPU, {"foreach": True}),
        (torch.optim.Adam, {"lr": 1e-3, "foreach": False}, [{}], CPU, {}),  # the user chose
        (torch.optim.Adam, {"lr": 1e-3}, [{"foreach": False}], CPU, {}),
        (torch.optim.Adam, {"lr": 1e-3, "fused": True}, [{}], CPU, {}),
        (torch.optim.RAdam, {"lr": 1e-3}, [{}], CPU, {}),  # its foreach path differs in the last bits
        (torch.optim.NAdam, {"lr": 1e-3}, [{}], CPU, {}),
        (InPlaceMomentum, {"lr": 0.1}, [{}], CPU, {}),  # a custom optimizer: torch's (its own) default
        (torch.optim.Adam, {"lr": 1e-3}, [{}], torch.device("meta"), {}),  # only on the CPU
    ],
    ids=["adam", "sgd-groups", "user-foreach-false", "group-foreach-false", "fused", "radam", "nadam", "custom", "not-cpu"],
)
def test_kernel_choice(optimizer, kwargs, groups, device, expected):
    assert kernel_choice(optimizer, groups, kwargs, [torch.float32], device) == expected


def test_the_shard_keeps_its_choice_while_the_job_keeps_the_users():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine = ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, config=ps.JobConfig(num_workers=1))
    shard = engine.shards.shards[0]
    for step in range(2):
        engine.push(0, step, [torch.ones_like(p) for p in model.parameters()])
        assert [g["foreach"] for g in shard.optimizer.param_groups] == [True]  # set again after each step's hyperparameters
    assert engine.state_dict()["optimizer"]["param_groups"][0]["foreach"] is None
