"""The membership and step-policy options of a job (lease_timeout, min_workers, max_workers, close_after, mode,
max_staleness, staleness_lr) on the wire: round trips, the
defaults a client that leaves them out gets, and CreateJob's comparison of two configs."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.core.params import normalize_params
from paramserver.wire import jobconfig
from paramserver.wire.proto.v1 import paramserver_pb2 as pb


def model_params():
    return normalize_params([("w", torch.zeros(3, 4)), ("b", torch.zeros(4))])


SGD = ps.OptimizerConfig("SGD", {"lr": 0.1})


def _round_trip(config: ps.JobConfig) -> tuple[ps.JobConfig, pb.JobConfig]:
    params = model_params()
    msg = jobconfig.to_proto(config, params)
    back, _ = jobconfig.from_proto(msg)
    assert repr(back) == repr(config.replace(groups=tuple(params.group_options)))
    assert jobconfig.to_proto(back, params) == msg
    return back, msg


@pytest.mark.parametrize("changes", [
    {"lease_timeout": 2.5},
    {"min_workers": 2, "num_workers": 3},
    {"max_workers": 5, "num_workers": 2},
    {"max_workers": 4, "min_workers": 3, "num_workers": 2, "lease_timeout": 0.25},
    {"close_after": 2, "num_workers": 3},
    {"mode": "async", "num_workers": 3},
    {"mode": "async", "max_staleness": 2, "staleness_lr": True, "num_workers": 3},
])
def test_round_trip_of_the_membership_fields(changes):
    back, msg = _round_trip(ps.JobConfig(optimizer=SGD, **changes))
    for name, value in changes.items():
        assert getattr(back, name) == value
    assert msg.HasField("lease_timeout") and msg.HasField("min_workers")


def test_the_defaults_travel_written_out_and_max_workers_absent_means_num_workers():
    back, msg = _round_trip(ps.JobConfig(optimizer=SGD, num_workers=3))
    assert msg.lease_timeout == 30.0 and msg.min_workers == 1 and not msg.HasField("max_workers")
    assert back.max_workers is None and back.workers_limit == 3


def test_a_client_that_leaves_them_out_gets_the_trees_defaults():
    msg = pb.JobConfig(optimizer="SGD", group_options_json=["{}"], params=[pb.ParamSpec(name="w", shape=[2], dtype="float32")], num_workers=2)
    config, _ = jobconfig.from_proto(msg)
    default = ps.JobConfig()
    assert config.lease_timeout == default.lease_timeout == 30.0
    assert config.min_workers == default.min_workers == 1
    assert config.max_workers is None and config.workers_limit == 2
    python_client = jobconfig.to_proto(ps.JobConfig(optimizer=ps.OptimizerConfig("SGD"), num_workers=2), normalize_params([("w", torch.zeros(2))]))
    assert jobconfig.canonical(msg) == jobconfig.canonical(python_client)


def test_canonical_compares_the_membership_fields():
    params = model_params()
    base = jobconfig.canonical(jobconfig.to_proto(ps.JobConfig(optimizer=SGD, num_workers=2), params))
    # max_workers=num_workers says what leaving it out says: the same job
    same = jobconfig.canonical(jobconfig.to_proto(ps.JobConfig(optimizer=SGD, num_workers=2, max_workers=2), params))
    assert same == base and not same.HasField("max_workers")
    for changes in ({"lease_timeout": 3.0}, {"min_workers": 2}, {"max_workers": 4}):
        other = jobconfig.canonical(jobconfig.to_proto(ps.JobConfig(optimizer=SGD, num_workers=2, **changes), params))
        assert other != base, changes


@pytest.mark.parametrize("mutate,match", [
    (lambda m: setattr(m, "lease_timeout", 0.0), "lease_timeout"),
    (lambda m: setattr(m, "lease_timeout", -1.0), "lease_timeout"),
    (lambda m: setattr(m, "min_workers", 0), "min_workers"),
    (lambda m: setattr(m, "min_workers", 5), "min_workers"),
    (lambda m: setattr(m, "max_workers", 1), "max_workers"),  # below num_workers
])
def test_bad_membership_fields_on_the_wire_are_value_errors(mutate, match):
    msg = jobconfig.to_proto(ps.JobConfig(num_workers=2), model_params())
    mutate(msg)
    with pytest.raises(ValueError, match=match):
        jobconfig.from_proto(msg)
