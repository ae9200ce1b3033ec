"""The configuration tree: one default per option, a docstring per field, ValueError naming the field."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import paramserver as ps
from paramserver.core import config as cfg

TREE = [cfg.JobConfig, cfg.OptimizerConfig, cfg.ClipConfig, cfg.SchedulerSpec, cfg.ServerConfig, cfg.RayConfig]


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    docs = cfg.field_docs(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= set(docs), f"{cls.__name__}: fields without a docstring"


def test_defaults_are_torchs_and_the_projects_one_set():
    job = ps.JobConfig()
    assert job.clip.norm_type == 2.0 and job.clip.max_norm is None and not job.clip.error_if_nonfinite
    assert job.deterministic is True and job.nonfinite == "skip" and job.num_workers == 1
    assert job.split_threshold_bytes == cfg.DEFAULT_SPLIT_THRESHOLD_BYTES == 32 * 2**20
    assert job.grad_dtype is None and job.scheduler is None and job.groups == ()
    assert cfg.default_of("clip.norm_type") == 2.0


def test_remote_optimizer_kwargs_table_names_real_fields():
    for name, path in cfg.REMOTE_OPTIMIZER_KWARGS.items():
        cfg.default_of(path)  # raises AttributeError for a path that is not in the tree
    built = cfg.job_config_from_kwargs("Adam", {"lr": 0.1}, clip_grad_norm=1.0, norm_type=math.inf, num_workers=3,
                                       error_if_nonfinite=True, grad_dtype=torch.bfloat16)
    assert built.clip == ps.ClipConfig(max_norm=1.0, norm_type=math.inf, error_if_nonfinite=True)
    assert built.num_workers == 3 and built.grad_dtype is torch.bfloat16 and built.optimizer == ps.OptimizerConfig("Adam", {"lr": 0.1})
    with pytest.raises(ValueError, match="unknown job options"):
        cfg.job_config_from_kwargs("SGD", {}, momentum_typo=0.9)


# (what, build, the field the error names)
BAD = [
    ("num_workers 0", lambda: ps.JobConfig(num_workers=0), "num_workers"),
    ("num_workers bool", lambda: ps.JobConfig(num_workers=True), "num_workers"),
    ("nonfinite", lambda: ps.JobConfig(nonfinite="ignore"), "nonfinite"),
    ("deterministic", lambda: ps.JobConfig(deterministic="yes"), "deterministic"),
    ("split 0", lambda: ps.JobConfig(split_threshold_bytes=0), "split_threshold_bytes"),
    ("grad dtype", lambda: ps.JobConfig(grad_dtype=torch.int8), "grad_dtype"),
    ("clip type", lambda: ps.JobConfig(clip={"max_norm": 1.0}), "clip"),
    ("group params", lambda: ps.JobConfig(groups=({"params": []},)), "params"),
    ("optimizer kwargs", lambda: ps.OptimizerConfig("SGD", [0.1]), "optimizer kwargs"),
    ("optimizer params", lambda: ps.OptimizerConfig("SGD", {"params": []}), "params"),
    ("norm nan", lambda: ps.ClipConfig(norm_type=math.nan), "norm_type"),
    ("max_norm", lambda: ps.ClipConfig(max_norm=-1.0), "max_norm"),
    ("interval", lambda: ps.SchedulerSpec("StepLR", {}, 0), "interval"),
    ("num_shards", lambda: ps.ServerConfig(num_shards=0), "num_shards"),
    ("port", lambda: ps.ServerConfig(port=70000), "port"),
    ("threads", lambda: ps.ServerConfig(grpc_threads=0), "grpc_threads"),
    ("chunk", lambda: ps.ServerConfig(chunk_bytes=2**20, max_message_bytes=2**20), "chunk_bytes"),
    ("placement", lambda: ps.RayConfig(placement="ANYWHERE"), "placement"),
    ("gpus", lambda: ps.RayConfig(gpus_per_shard=-1), "gpus_per_shard"),
    ("placement timeout", lambda: ps.RayConfig(placement_timeout=0), "placement_timeout"),
    ("standby timeout", lambda: ps.RayConfig(standby_timeout=0), "standby_timeout"),
    ("replicas of 2", lambda: ps.RayConfig(replicas=2), "replicas must be 0 or 1"),
    ("replicas as a bool", lambda: ps.RayConfig(replicas=True), "replicas must be 0 or 1"),
]


@pytest.mark.parametrize("build,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_split_options_sorts_keywords_by_config_and_refuses_unknown_ones():
    server, ray = cfg.split_options({"port": 1, "placement": "PACK"}, cfg.ServerConfig, cfg.RayConfig)
    assert server == {"port": 1} and ray == {"placement": "PACK"}
    with pytest.raises(TypeError, match="unknown option 'prot'"):
        cfg.split_options({"prot": 1}, cfg.ServerConfig, cfg.RayConfig)


def test_engine_takes_the_optimizer_in_one_place():
    model = torch.nn.Linear(3, 2)
    from_config = ps.StepEngine(model.parameters(), config=ps.JobConfig(optimizer=ps.OptimizerConfig("SGD", {"lr": 0.5})))
    assert from_config.job.optimizer_cls is torch.optim.SGD and from_config.get_last_lr() == [0.5]
    with pytest.raises(ValueError, match="optimizer is given twice"):
        ps.StepEngine(model.parameters(), "Adam", config=ps.JobConfig(optimizer=ps.OptimizerConfig("SGD", {"lr": 0.1})))
    with pytest.raises(ValueError, match="without an optimizer"):
        ps.StepEngine(model.parameters(), lr=0.1)
    engine = ps.StepEngine([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.1}], "SGD", lr=1.0)
    assert engine.job.config.groups == ({}, {"lr": 0.1})  # the tree's groups come from the params
