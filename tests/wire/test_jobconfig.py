"""The JobConfig proto and the configuration tree convert in one place, both ways, over every field."""

from __future__ import annotations

import math

import pytest
import torch

import paramserver as ps
from paramserver.core.params import normalize_params
from paramserver.wire import jobconfig
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

MODEL_PARAMS = lambda: normalize_params([  # noqa: E731
    {"params": [("w", torch.zeros(3, 4))]},
    {"params": [("b", torch.zeros(4, dtype=torch.float64))], "lr": 0.01, "betas": (0.8, 0.9)},
])

# Every field of the tree moved off its default, one at a time.
CHANGED = {
    "optimizer": ps.OptimizerConfig("Adam", {"lr": 0.1, "betas": (0.5, 0.6), "lr_t": torch.tensor(0.1)}),
    "clip.max_norm": ps.ClipConfig(max_norm=1.5),
    "clip.norm_type": ps.ClipConfig(norm_type=math.inf),
    "clip.error_if_nonfinite": ps.ClipConfig(error_if_nonfinite=True),
    "clip.clip_value": ps.ClipConfig(clip_value=0.25),
    "scheduler": ps.SchedulerSpec("StepLR", {"step_size": 3, "gamma": 0.5}, 2),
    "num_workers": 7,
    "nonfinite": "error",
    "deterministic": False,
    "split_threshold_bytes": 1024,
    "split_threshold_bytes=None": None,
    "grad_dtype": torch.bfloat16,
}


def _config(key: str) -> ps.JobConfig:
    field = key.split("=")[0].split(".")[0]
    return ps.JobConfig(**{"optimizer": ps.OptimizerConfig("SGD", {"lr": 0.1}), field: CHANGED[key]})


def _same(a: ps.JobConfig, b: ps.JobConfig) -> None:
    # tensors compare by value, not identity
    assert repr(a) == repr(b)


def test_round_trip_of_the_defaults():
    params = MODEL_PARAMS()
    config = ps.JobConfig()
    back, groups = jobconfig.from_proto(jobconfig.to_proto(config, params))
    _same(back, config.replace(groups=tuple(params.group_options)))
    assert [len(g["params"]) for g in groups] == [1, 1] and all(t.is_meta for g in groups for _, t in g["params"])


@pytest.mark.parametrize("key", list(CHANGED))
def test_round_trip_of_every_field(key):
    params = MODEL_PARAMS()
    config = _config(key)
    msg = jobconfig.to_proto(config, params)
    back, _ = jobconfig.from_proto(msg)
    _same(back, config.replace(groups=tuple(params.group_options)))
    assert jobconfig.to_proto(back, params) == msg


def test_a_client_that_leaves_fields_out_gets_the_trees_defaults():
    """What a client in another language sends when it sets only what it must."""
    msg = pb.JobConfig(optimizer="SGD", group_options_json=["{}"], params=[pb.ParamSpec(name="w", shape=[2], dtype="float32")])
    config, _ = jobconfig.from_proto(msg)
    default = ps.JobConfig()
    assert config.clip.norm_type == 2.0 and config.deterministic is True and config.nonfinite == "skip"
    assert config.num_workers == 1 and config.split_threshold_bytes == default.split_threshold_bytes
    spec = jobconfig.build_job(msg, 2, ())
    assert spec.config.deterministic and spec.config.clip.norm_type == 2.0
    # and it is the same job as a Python client's, which writes every field out
    python_client = jobconfig.to_proto(ps.JobConfig(optimizer=ps.OptimizerConfig("SGD")), normalize_params([("w", torch.zeros(2))]))
    assert jobconfig.canonical(msg) == jobconfig.canonical(python_client)


def test_zero_split_threshold_on_the_wire_means_never_split():
    msg = jobconfig.to_proto(ps.JobConfig(split_threshold_bytes=None), MODEL_PARAMS())
    assert msg.HasField("split_threshold_bytes") and msg.split_threshold_bytes == 0
    assert jobconfig.from_proto(msg)[0].split_threshold_bytes is None


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m, "nonfinite", "ignore"), "nonfinite"),
    (lambda m: setattr(m, "num_workers", 0), "num_workers"),
    (lambda m: setattr(m.clip, "norm_type", math.nan), "norm_type"),
    (lambda m: setattr(m, "grad_dtype", "int8"), "dtype"),
    (lambda m: setattr(m, "optimizer_kwargs_json", "[1]"), "JSON object"),
])
def test_bad_fields_on_the_wire_are_value_errors(mutate, match):
    msg = jobconfig.to_proto(ps.JobConfig(), MODEL_PARAMS())
    mutate(msg)
    with pytest.raises(ValueError, match=match):
        jobconfig.from_proto(msg)
