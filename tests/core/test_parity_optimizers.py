"""Optimizer parity: the step engine must reproduce local torch.optim training on the mean gradient.

Every optimizer the service runs (torch.optim's, and user-defined ones named by import path) is trained
for ``STEPS`` steps both by ``StepEngine`` and by ``tests.helpers.reference.Reference`` on the same workers'
gradients, over shards x workers x clipping, then the weights and the whole optimizer state dict
(torch's format, param_groups included) are compared.

Expected precision (``tolerance``): bitwise (rtol = atol = 0) in deterministic mode, except when a tensor
is cut across shards *and* the gradients are clipped by a finite p-norm (1e-6); with deterministic=False,
1e-6 (Muon: one bfloat16 ulp). Deterministic mode is also bitwise whatever order the pushes arrive in.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import paramserver as ps
from paramserver.core.config import DEFAULT_SPLIT_THRESHOLD_BYTES
from tests.helpers import custom_optimizers
from tests.helpers.reference import (
    Reference,
    assert_state_equal,
    make_model,
    push_step,
    worker_grads,
)

STEPS = 20
SHARDS = [1, 2, 3, 5]
WORKERS = [1, 3]
SMALL_SPLIT = 64  # bytes: every tensor above 16 float32 elements is cut into pieces (elementwise optimizers)

# The mean gradient of ``worker_grads`` over make_model()'s 392 elements has a 2-norm of 18.7..21 (one
# worker) or 23..27 (three workers) and an inf-norm of 2.5..5.2. Every fifth step is scaled by 0.3 (2-norm
# about 6..8, inf-norm about 0.8..1.6) so that the clamp to 1 is exercised too. With these max_norms
# clipping acts on the other steps, i.e. on 80% of them; ``run_case`` checks it.
CLIPS = {
    "noclip": ps.ClipConfig(),
    "clip2": ps.ClipConfig(max_norm=10.0, norm_type=2.0),
    "clipinf": ps.ClipConfig(max_norm=2.0, norm_type=math.inf),
}


def grad_scale(step: int) -> float:
    return 0.3 if step % 5 == 4 else 1.0


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Run this module with one torch thread. Its tensors are far below torch's parallel grain size, but on
    a loaded 2-core machine the thread pool's hand-offs (Muon's small matmuls above all) made single cases
    take seconds instead of milliseconds. The engine and the reference run in this process under the same
    setting, so parity is unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the optimizers and their configurations ---------------------------------------------------------------


@dataclass(frozen=True)
class Opt:
    """How to name an optimizer to the engine, its class for the reference, and what it accepts."""

    name: str  # what the engine is given: a torch.optim name or a "tests.<module>:Class" import path
    cls: type
    elementwise: bool
    only_2d: bool = False  # Muon: 2-D parameters only
    group0: dict[str, Any] = field(default_factory=dict)  # options of the first of two param groups


def _custom(cls: type, **group0: Any) -> Opt:
    # Not in the engine's list of elementwise optimizers, so never split.
    return Opt(f"tests.helpers.custom_optimizers:{cls.__name__}", cls, False, group0=group0)


OPTS = {
    "SGD": Opt("SGD", torch.optim.SGD, True, group0={"lr": 0.05, "momentum": 0.5, "nesterov": False}),
    "Adam": Opt("Adam", torch.optim.Adam, True, group0={"lr": 0.01, "amsgrad": True, "betas": (0.8, 0.99)}),
    "AdamW": Opt("AdamW", torch.optim.AdamW, True, group0={"lr": 0.02, "weight_decay": 0.0, "amsgrad": True}),
    "RMSprop": Opt("RMSprop", torch.optim.RMSprop, True, group0={"lr": 0.001, "centered": True, "momentum": 0.5}),
    "Adagrad": Opt("Adagrad", torch.optim.Adagrad, True, group0={"lr": 0.1, "lr_decay": 0.01}),
    "Adadelta": Opt("Adadelta", torch.optim.Adadelta, True, group0={"lr": 0.5, "rho": 0.5}),
    "Adamax": Opt("Adamax", torch.optim.Adamax, True, group0={"lr": 0.01, "weight_decay": 0.1}),
    "NAdam": Opt("NAdam", torch.optim.NAdam, True, group0={"lr": 0.01, "momentum_decay": 0.01}),
    "RAdam": Opt("RAdam", torch.optim.RAdam, True, group0={"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    "ASGD": Opt("ASGD", torch.optim.ASGD, True, group0={"lr": 0.05, "t0": 3.0}),
    "Rprop": Opt("Rprop", torch.optim.Rprop, True, group0={"lr": 0.05, "etas": (0.3, 1.5)}),
    "Adafactor": Opt("Adafactor", torch.optim.Adafactor, False, group0={"lr": 0.05, "d": 2.0}),
    "Muon": Opt("Muon", torch.optim.Muon, False, only_2d=True, group0={"lr": 0.01, "momentum": 0.8, "nesterov": False}),
    "ReplacingSGD": _custom(custom_optimizers.ReplacingSGD, lr=0.1),
    "InPlaceMomentum": _custom(custom_optimizers.InPlaceMomentum, lr=0.1, momentum=0.5),
}


def lr_tensor(value: float) -> torch.Tensor:
    return torch.tensor(value)


# (optimizer, id, kwargs), as torch's own optimizer tests tabulate them. The first config of each optimizer
# is its default one. Tensors in kwargs are deep-copied by both the engine and the reference.
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("SGD", "default", {}),
    ("SGD", "momentum", {"lr": 0.01, "momentum": 0.9}),
    ("SGD", "momentum_dampening", {"lr": 0.01, "momentum": 0.9, "dampening": 0.5}),
    ("SGD", "nesterov_wd", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", "wd_maximize", {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    ("SGD", "lr_tensor_momentum", {"lr": lr_tensor(0.01), "momentum": 0.9}),
    ("SGD", "fused_momentum", {"lr": 0.01, "momentum": 0.9, "fused": True}),  # torch's fused CPU kernels
    ("Adam", "default", {}),
    ("Adam", "amsgrad", {"lr": 0.01, "amsgrad": True}),
    ("Adam", "wd", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adam", "amsgrad_wd_maximize", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    ("Adam", "betas_eps", {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-4}),
    ("Adam", "decoupled_wd", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("Adam", "lr_tensor", {"lr": lr_tensor(0.01)}),
    ("Adam", "lr_tensor_amsgrad", {"lr": lr_tensor(0.01), "amsgrad": True, "weight_decay": 0.05}),
    ("Adam", "fused", {"lr": 0.01, "fused": True}),
    ("AdamW", "default", {}),
    ("AdamW", "amsgrad", {"lr": 0.01, "amsgrad": True}),
    ("AdamW", "wd", {"lr": 0.01, "weight_decay": 0.5}),
    ("AdamW", "amsgrad_wd_maximize", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "maximize": True}),
    ("AdamW", "lr_tensor", {"lr": lr_tensor(0.01)}),
    ("AdamW", "fused_amsgrad", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "fused": True}),
    ("RMSprop", "default", {}),
    ("RMSprop", "centered", {"lr": 0.001, "centered": True}),
    ("RMSprop", "momentum", {"lr": 0.001, "momentum": 0.9}),
    ("RMSprop", "centered_momentum_wd", {"lr": 0.001, "centered": True, "momentum": 0.9, "weight_decay": 0.1}),
    ("RMSprop", "alpha_maximize", {"lr": 0.001, "alpha": 0.9, "maximize": True}),
    ("RMSprop", "lr_tensor_centered", {"lr": lr_tensor(0.001), "centered": True}),
    ("Adagrad", "default", {}),
    ("Adagrad", "lr_decay", {"lr": 0.1, "lr_decay": 0.05}),
    ("Adagrad", "initial_accumulator", {"lr": 0.1, "initial_accumulator_value": 0.5}),
    ("Adagrad", "wd_maximize_eps", {"lr": 0.1, "weight_decay": 0.1, "maximize": True, "eps": 1e-4}),
    ("Adagrad", "lr_tensor", {"lr": lr_tensor(0.1), "lr_decay": 0.01}),
    ("Adagrad", "fused", {"lr": 0.1, "fused": True}),
    ("Adadelta", "default", {}),
    ("Adadelta", "rho", {"lr": 0.5, "rho": 0.5}),
    ("Adadelta", "wd_maximize", {"weight_decay": 0.1, "maximize": True}),
    ("Adadelta", "lr_tensor", {"lr": lr_tensor(0.5)}),
    ("Adamax", "default", {}),
    ("Adamax", "wd", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adamax", "betas_maximize", {"lr": 0.01, "betas": (0.8, 0.9), "maximize": True}),
    ("Adamax", "lr_tensor", {"lr": lr_tensor(0.01)}),
    ("NAdam", "default", {}),
    ("NAdam", "momentum_decay", {"lr": 0.01, "momentum_decay": 0.02}),
    ("NAdam", "wd", {"lr": 0.01, "weight_decay": 0.1}),
    ("NAdam", "decoupled_wd", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("NAdam", "maximize", {"lr": 0.01, "maximize": True}),
    ("NAdam", "lr_tensor", {"lr": lr_tensor(0.01), "decoupled_weight_decay": True, "weight_decay": 0.05}),
    ("RAdam", "default", {}),
    ("RAdam", "wd", {"lr": 0.01, "weight_decay": 0.1}),
    ("RAdam", "decoupled_wd", {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("RAdam", "maximize", {"lr": 0.01, "maximize": True}),
    ("RAdam", "lr_tensor", {"lr": lr_tensor(0.01)}),
    ("ASGD", "default", {}),
    ("ASGD", "averaging", {"lr": 0.05, "t0": 5.0, "lambd": 0.01, "alpha": 0.5}),
    ("ASGD", "wd_maximize", {"lr": 0.05, "weight_decay": 0.1, "maximize": True, "t0": 10.0}),
    ("ASGD", "lr_tensor", {"lr": lr_tensor(0.05), "t0": 5.0}),
    ("Rprop", "default", {}),
    ("Rprop", "etas_step_sizes", {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.2)}),
    ("Rprop", "maximize", {"maximize": True}),
    ("Rprop", "lr_tensor", {"lr": lr_tensor(0.05)}),
    ("Adafactor", "default", {}),
    ("Adafactor", "beta2_decay_d", {"lr": 0.05, "beta2_decay": -0.5, "d": 2.0}),
    ("Adafactor", "eps_wd", {"lr": 0.05, "eps": (1e-30, 1e-2), "weight_decay": 0.1}),
    ("Adafactor", "maximize", {"maximize": True}),
    ("Adafactor", "lr_tensor", {"lr": lr_tensor(0.05)}),
    ("Muon", "default", {}),
    ("Muon", "no_nesterov", {"lr": 0.01, "nesterov": False, "momentum": 0.9}),
    ("Muon", "no_wd_ns3", {"lr": 0.01, "weight_decay": 0.0, "ns_steps": 3}),
    ("Muon", "match_rms_adamw", {"lr": 0.01, "adjust_lr_fn": "match_rms_adamw"}),
    ("Muon", "lr_tensor", {"lr": lr_tensor(0.01), "momentum": 0.9}),
    ("ReplacingSGD", "default", {}),
    ("ReplacingSGD", "lr", {"lr": 0.05}),
    ("InPlaceMomentum", "default", {}),
    ("InPlaceMomentum", "momentum", {"lr": 0.05, "momentum": 0.99}),
]
DEFAULTS = {opt: kwargs for opt, cid, kwargs in CONFIGS if cid == "default"}
assert set(DEFAULTS) == set(OPTS) and {opt for opt, _, _ in CONFIGS} == set(OPTS)


# -- running one case ----------------------------------------------------------------------------------------


def select_params(model: torch.nn.Module, opt: Opt, kind: str) -> list[Any]:
    """The params argument, the same way for the engine and the reference.

    kind: "named" (``named_parameters()``), "plain" (``parameters()``), or "groups" (two named groups: the
    model's last layers with ``opt.group0``'s own options, then its first two Linear layers with the
    optimizer's kwargs, so that torch's parameter numbering differs from the model's order).
    """
    named = [(n, p) for n, p in model.named_parameters() if not opt.only_2d or p.dim() == 2]
    if kind == "named":
        return named
    if kind == "plain":
        return [p for _, p in named]
    assert kind == "groups"
    head = [(n, p) for n, p in named if n.split(".")[0] in ("0", "2")]
    tail = [(n, p) for n, p in named if n.split(".")[0] not in ("0", "2")]
    return [{"params": tail, **opt.group0}, {"params": head}]


BITWISE = 0.0
# A tensor cut across shards and clipped by a finite p-norm: its norm is the p-norm of its pieces' norms,
# while torch's clip_grad_norm_ takes one norm of the whole tensor. The two round differently (the
# inf-norm, a max, is exact), so the clip coefficient differs in its last bit or so, and with it every
# gradient and everything after. Measured: 30 of 33 runs (every elementwise optimizer, 2, 3, 5 shards)
# are not bitwise; they differ by a few ulps of each tensor's magnitude (at most 1.2e-7 on weights of
# order 0.1..1, 2.4e-7 on a centered RMSprop momentum buffer of order 10).
SPLIT_PNORM_CLIP = 1e-6
# deterministic=False adds the workers' gradients in arrival order, not rank order: a different rounding
# of every step's mean. Measured: never bitwise; at most 6e-7 on momentum buffers of magnitude ~7.
NONDETERMINISTIC = 1e-6
# ...except Muon, which orthogonalizes its update in bfloat16 (grad.bfloat16() in Newton-Schulz): a
# last-bit change of the float32 gradient sometimes flips a bf16 rounding, and the update then moves by
# up to a bf16 ulp (2**-8 relative). Measured: weights differ by up to 4.8e-4 of their scale against the
# reference; local torch.optim.Muon alone, fed the same means summed in the same arrival orders instead
# of rank order, differs from itself by 2.2e-4 of the scale (lr_tensor config, two groups), so this is
# Muon's own sensitivity, not the engine's.
MUON_NONDETERMINISTIC = 2**-8


def tolerance(engine: ps.StepEngine) -> float:
    """The relative tolerance of one case; 0.0 is bitwise."""
    config = engine.config
    if not config.deterministic:
        return MUON_NONDETERMINISTIC if engine.job.optimizer_cls is torch.optim.Muon else NONDETERMINISTIC
    split = any(engine.plan.is_split(p.index) for p in engine.plan.params)
    if split and config.clip.max_norm is not None and config.clip.norm_type != math.inf:
        return SPLIT_PNORM_CLIP
    return BITWISE


def _scales(tensors_by_kind: list[tuple[str, Any]]) -> dict[str, float]:
    scales: dict[str, float] = {}
    for kind, value in tensors_by_kind:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0:
            scales[kind] = max(scales.get(kind, 0.0), float(value.abs().max()))
    return scales


def assert_close_to_scale(actual: list[torch.Tensor], expected: list[torch.Tensor], actual_opt: dict[str, Any], expected_opt: dict[str, Any], rtol: float) -> None:
    """Weights and optimizer state within ``rtol``, relative to each element and to the scale of its kind.

    A rounding difference is a few ulps of the magnitude of the quantity: it reaches every element, also
    those that pass near zero (a weight crossing zero, a moment of a gradient that changes sign), where
    the elementwise relative error is not small although the difference is. So each tensor also gets an
    absolute tolerance of ``rtol`` times the largest magnitude of its kind over the whole model (all
    weights; all parameters' ``exp_avg``; ...). Everything else (steps, param_groups) must be equal.
    """
    weight_atol = rtol * _scales([("w", e) for e in expected]).get("w", 0.0)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_state_equal(a, e, rtol, weight_atol, f"weight[{i}]")
    assert_state_equal(actual_opt["param_groups"], expected_opt["param_groups"], path="optimizer.param_groups")
    state, expected_state = actual_opt["state"], expected_opt["state"]
    assert set(state) == set(expected_state), f"optimizer.state: keys {sorted(state)} != {sorted(expected_state)}"
    scales = _scales([(k, v) for st in expected_state.values() for k, v in st.items()])
    for p, st in expected_state.items():
        assert set(state[p]) == set(st), f"optimizer.state.{p}: keys {sorted(state[p])} != {sorted(st)}"
        for k, v in st.items():
            path = f"optimizer.state.{p}.{k}"
            if k in scales and isinstance(v, torch.Tensor):
                assert_state_equal(state[p][k], v, rtol, rtol * scales[k], path)
            else:
                assert_state_equal(state[p][k], v, path=path)


@dataclass
class Case:
    engine: ps.StepEngine
    ref: Reference
    results: list[ps.StepResult]
    initial: list[torch.Tensor]  # the weights before the first step, in the engine's parameter order


def run_case(
    opt_name: str,
    kwargs: dict[str, Any],
    *,
    shards: int,
    workers: int,
    clip: str,
    kind: str = "named",
    split: int | None = DEFAULT_SPLIT_THRESHOLD_BYTES,
    deterministic: bool = True,
    orders: list[list[int]] | None = None,
    steps: int = STEPS,
) -> Case:
    """Train with the engine and with the reference on the same gradients; return both after ``steps``."""
    opt = OPTS[opt_name]
    clip_config = CLIPS[clip]
    config = ps.JobConfig(num_workers=workers, clip=clip_config, split_threshold_bytes=split, deterministic=deterministic)
    with warnings.catch_warnings():
        # A non-elementwise optimizer with a small split threshold warns that its tensors stay whole.
        warnings.filterwarnings("ignore", message=".*is not elementwise.*")
        engine = ps.StepEngine(select_params(make_model(), opt, kind), opt.name, config=config, num_shards=shards,
                               trusted_modules=("tests",), **kwargs)
    ref = Reference(select_params(make_model(), opt, kind), opt.cls, kwargs, clip=clip_config)
    initial = [p.detach().clone() for p in ref.params]
    results = []
    for step in range(steps):
        grads = worker_grads(ref.params, step, workers, seed=1, scale=grad_scale(step))
        order = orders[step % len(orders)] if orders is not None else None
        results.append(push_step(engine, step, grads, order=order))
        ref.step(grads)
    assert engine.version == steps and not any(r.skipped for r in results)
    if clip_config.max_norm is not None:
        clipped = sum(r.clip_coef < 1.0 for r in results)
        assert steps // 2 < clipped < steps, f"clipping acted on {clipped} of {steps} steps"
    return Case(engine, ref, results, initial)


def assert_parity(case: Case, rtol: float) -> None:
    """Weights and the optimizer state dict of the engine equal the reference's (bitwise when rtol == 0)."""
    weights = case.engine.parameters()
    expected = [p.detach() for p in case.ref.params]
    assert len(weights) == len(expected)
    optimizer, expected_optimizer = case.engine.state_dict()["optimizer"], case.ref.optimizer.state_dict()
    if rtol == BITWISE:
        for i, (w, e) in enumerate(zip(weights, expected)):
            assert_state_equal(w, e, path=f"weight[{i}]")
        assert_state_equal(optimizer, expected_optimizer, path="optimizer")
    else:
        assert_close_to_scale(weights, expected, optimizer, expected_optimizer, rtol)
    # The weights moved: a run that changes nothing would pass trivially.
    assert all(not torch.equal(w, s) for w, s in zip(weights, case.initial))


def check(opt_name: str, kwargs: dict[str, Any], **setup: Any) -> Case:
    case = run_case(opt_name, kwargs, **setup)
    assert_parity(case, tolerance(case.engine))
    return case


# -- the suite -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("shards", SHARDS)
@pytest.mark.parametrize("opt_name", list(OPTS))
def test_parity_default_config_shards_workers_clipping(opt_name, shards, workers, clip):
    """Each optimizer's default config over the full shards x workers x clipping product; whole tensors."""
    case = check(opt_name, DEFAULTS[opt_name], shards=shards, workers=workers, clip=clip)
    assert tolerance(case.engine) == BITWISE


# Each config runs in these setups, which between them meet every value of every axis. split=SMALL_SPLIT
# cuts the tensors of elementwise optimizers across shards; without it the default threshold (32 MiB)
# keeps this model's tensors whole.
SETUPS = {
    "s2w3clip2plain": dict(shards=2, workers=3, clip="clip2", kind="plain"),
    "s5w1clipinfgroups": dict(shards=5, workers=1, clip="clipinf", kind="groups"),
    "s3w3noclipnamed_split": dict(shards=3, workers=3, clip="noclip", kind="named", split=SMALL_SPLIT),
    "s1w1clip2groups": dict(shards=1, workers=1, clip="clip2", kind="groups"),
    "s5w3clip2groups_split_nondeterministic": dict(
        shards=5, workers=3, clip="clip2", kind="groups", split=SMALL_SPLIT, deterministic=False, orders=[[2, 0, 1], [1, 2, 0]]
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize(("opt_name", "kwargs"), [pytest.param(o, k, id=f"{o}-{c}") for o, c, k in CONFIGS])
def test_parity_configs(opt_name, kwargs, setup):
    check(opt_name, kwargs, **SETUPS[setup])


SPLIT_OPTS = [name for name, opt in OPTS.items() if opt.elementwise]


@pytest.mark.slow
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("shards", [2, 3, 5])
@pytest.mark.parametrize("opt_name", SPLIT_OPTS)
def test_parity_split_tensors(opt_name, shards, clip):
    """Elementwise optimizers with tensors cut across shards: bitwise, except under finite p-norm clipping."""
    workers = 3 if shards != 3 else 1
    kind = {2: "plain", 3: "named", 5: "groups"}[shards]
    case = check(opt_name, DEFAULTS[opt_name], shards=shards, workers=workers, clip=clip, kind=kind, split=SMALL_SPLIT)
    plan = case.engine.plan
    split = sorted(math.prod(p.shape) for p in plan.params if plan.is_split(p.index))
    # pieces are cut on 64-element boundaries (``sharding.CUT_ALIGN_BYTES``): make_model's two tensors that hold more
    assert split == [102, 187], f"expected the two largest tensors split, got tensors of {split} elements"
    assert tolerance(case.engine) == (SPLIT_PNORM_CLIP if clip == "clip2" else BITWISE)


@pytest.mark.parametrize("opt_name", [name for name, opt in OPTS.items() if not opt.elementwise])
def test_parity_non_elementwise_stays_whole(opt_name):
    """A small split threshold leaves the tensors of a non-elementwise optimizer whole, with a warning."""
    opt = OPTS[opt_name]
    with pytest.warns(UserWarning, match="not elementwise"):
        engine = ps.StepEngine(
            select_params(make_model(), opt, "named"),
            opt.name,
            num_shards=3, trusted_modules=("tests",), config=ps.JobConfig(split_threshold_bytes=SMALL_SPLIT),
        )
    assert not any(engine.plan.is_split(p.index) for p in engine.plan.params)
    check(opt_name, DEFAULTS[opt_name], shards=3, workers=3, clip="clip2", split=SMALL_SPLIT)


# One config of every optimizer, on whole (split=None: never cut) or split tensors, for the push-order tests.
PUSH_ORDER_CASES = [
    ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True}, 2, SMALL_SPLIT),
    ("Adam", {"lr": 0.01, "amsgrad": True}, 3, None),
    ("AdamW", {"lr": 0.01}, 5, SMALL_SPLIT),
    ("RMSprop", {"lr": 0.001, "centered": True, "momentum": 0.5}, 5, SMALL_SPLIT),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}, 2, None),
    ("Adadelta", {}, 3, SMALL_SPLIT),
    ("Adamax", {"lr": 0.01}, 3, None),
    ("NAdam", {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1}, 2, SMALL_SPLIT),
    ("RAdam", {"lr": 0.01}, 5, None),
    ("ASGD", {"lr": 0.05, "t0": 5.0}, 3, SMALL_SPLIT),
    ("Rprop", {}, 2, SMALL_SPLIT),
    ("Adafactor", {}, 3, None),
    ("Muon", {"lr": 0.01}, 2, None),
    ("ReplacingSGD", {}, 3, None),
    ("InPlaceMomentum", {}, 2, None),
]
assert {c[0] for c in PUSH_ORDER_CASES} == set(OPTS)
ORDERS = [[2, 0, 1], [0, 1, 2], [1, 2, 0], [2, 1, 0]]


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["noclip", "clip2"])
@pytest.mark.parametrize(("opt_name", "kwargs", "shards", "split"), PUSH_ORDER_CASES, ids=[c[0] for c in PUSH_ORDER_CASES])
def test_parity_deterministic_whatever_push_order(opt_name, kwargs, shards, split, clip):
    """Deterministic mode folds the workers in rank order: pushes in any order give the same bits."""
    setup = dict(shards=shards, workers=3, clip=clip, split=split)
    in_order = run_case(opt_name, kwargs, **setup, orders=[[0, 1, 2]])
    shuffled = run_case(opt_name, kwargs, **setup, orders=[[2, 0, 1]])
    varying = run_case(opt_name, kwargs, **setup, orders=ORDERS)
    for other in (shuffled, varying):
        assert [r.total_norm for r in other.results] == [r.total_norm for r in in_order.results]
        assert [r.clip_coef for r in other.results] == [r.clip_coef for r in in_order.results]
        assert_state_equal(other.engine.state_dict(), in_order.engine.state_dict())
    assert_parity(shuffled, tolerance(shuffled.engine))


@pytest.mark.slow
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize(("opt_name", "kwargs", "shards", "split"), PUSH_ORDER_CASES, ids=[c[0] for c in PUSH_ORDER_CASES])
def test_parity_nondeterministic_within_1e6(opt_name, kwargs, shards, split, clip):
    """deterministic=False adds the workers' gradients as they arrive: the reference within 1e-6."""
    setup = dict(shards=shards, workers=3, clip=clip, split=split, deterministic=False)
    case = run_case(opt_name, kwargs, **setup, orders=ORDERS)
    assert tolerance(case.engine) in (NONDETERMINISTIC, MUON_NONDETERMINISTIC)
    assert_parity(case, tolerance(case.engine))
    # Arriving in rank order, the sum is the reference's, bit for bit (up to the split p-norm clipping).
    in_order = run_case(opt_name, kwargs, **setup, orders=[[0, 1, 2]])
    expected = SPLIT_PNORM_CLIP if split is not None and OPTS[opt_name].elementwise and clip == "clip2" else BITWISE
    assert_parity(in_order, expected)


def mixed_dtype_model() -> torch.nn.Module:
    """make_model() with its LayerNorm and third Linear in float64: two dtypes, so two flat buffers per shard
    and torch's clip_grad_norm_ grouping its norms by dtype."""
    model = make_model()
    model[3].double()
    model[4].double()
    return model


@pytest.mark.parametrize("split", [None, SMALL_SPLIT])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "Rprop", "Adafactor"])
def test_parity_mixed_dtypes(opt_name, clip, split):
    """float32 and float64 parameters in one job: bitwise, except split + 2-norm clipping as above."""
    opt = OPTS[opt_name]
    clip_config = CLIPS[clip]
    config = ps.JobConfig(num_workers=3, clip=clip_config, split_threshold_bytes=split)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not elementwise.*")
        engine = ps.StepEngine(list(mixed_dtype_model().named_parameters()), opt.name, config=config, num_shards=3)
    ref = Reference(list(mixed_dtype_model().named_parameters()), opt.cls, {}, clip=clip_config)
    initial = [p.detach().clone() for p in ref.params]
    assert {p.dtype for p in ref.params} == {torch.float32, torch.float64}
    results = []
    for step in range(STEPS):
        grads = worker_grads(ref.params, step, 3, seed=2, scale=grad_scale(step))
        results.append(push_step(engine, step, grads))
        ref.step(grads)
    if clip_config.max_norm is not None:
        assert sum(r.clip_coef < 1.0 for r in results) > STEPS // 2
    assert_parity(Case(engine, ref, results, initial), tolerance(engine))


def test_parity_axes_are_covered():
    """Every optimizer meets every value of every axis somewhere in this file."""
    seen: dict[str, set[tuple[str, Any]]] = {name: set() for name in OPTS}
    for name, shards, workers, clip in itertools.product(OPTS, SHARDS, WORKERS, CLIPS):
        seen[name] |= {("shards", shards), ("workers", workers), ("clip", clip), ("kind", "named")}
    for (name, _, kwargs), setup in itertools.product(CONFIGS, SETUPS.values()):
        seen[name] |= {("kind", setup["kind"])}
        if OPTS[name].elementwise and setup.get("split"):
            seen[name].add(("split", True))
        if isinstance(kwargs.get("lr"), torch.Tensor):
            seen[name].add(("lr", "tensor"))
    for name, opt in OPTS.items():
        assert {("kind", k) for k in ("named", "plain", "groups")} <= seen[name], name
        if opt.elementwise:
            assert ("split", True) in seen[name], name
    with_tensor_lr = [name for name in OPTS if ("lr", "tensor") in seen[name]]
    assert len(with_tensor_lr) >= 10, with_tensor_lr
