"""Parity of state in torch's formats, of non-finite steps and of bad input.

* export -> load into a local model, optimizer and scheduler -> continue: equals the engine continuing;
* a local optimizer's ``{"model", "optimizer", "scheduler"}`` -> a fresh engine -> continue: equals the local one;
* bad ``load_state_dict`` input raises ``ValueError`` and changes nothing;
* non-finite gradients: skipped (``nonfinite="skip"``) or refused (``nonfinite="error"``);
* bad pushes raise ``ValueError`` subclasses and change nothing; a repeated push is not counted twice.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as L

import paramserver as ps
from paramserver.core.errors import (
    FutureStepError,
    NonFiniteGradientError,
    StaleStepError,
)
from tests.helpers.reference import (
    Reference,
    assert_state_equal,
    make_model,
    push_step,
    worker_grads,
)

N = 6  # steps before the hand-over
M = 6  # steps after it
WORKERS = 3
LRS = (0.05, 0.01)


def build_params(model: torch.nn.Module, named: bool, lrs: tuple[float, float] | None = LRS) -> list[Any]:
    """Two param groups (weights of the Linear layers, then biases and the LayerNorm) whose order differs
    from the model's, so torch's numbering runs in group order."""
    items = list(model.named_parameters()) if named else list(model.parameters())
    if lrs is None:
        return items
    names = [n for n, _ in model.named_parameters()]
    first = [it for n, it in zip(names, items) if n.endswith("weight") and n != "3.weight"]
    rest = [it for n, it in zip(names, items) if not (n.endswith("weight") and n != "3.weight")]
    return [{"params": first, "lr": lrs[0]}, {"params": rest, "lr": lrs[1]}]


@dataclass(frozen=True)
class Opt:
    cls: type
    kwargs: dict[str, Any]
    spec: ps.SchedulerSpec
    reference: Callable[[torch.optim.Optimizer], Any]


OPTIMIZERS = {
    "Adam": Opt(torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True},
                ps.SchedulerSpec("OneCycleLR", {"max_lr": [0.05, 0.01], "total_steps": 20, "cycle_momentum": True}),
                lambda o: L.OneCycleLR(o, max_lr=[0.05, 0.01], total_steps=20, cycle_momentum=True)),
    "SGD": Opt(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
               ps.SchedulerSpec("CyclicLR", {"base_lr": [0.01, 0.001], "max_lr": [0.1, 0.01], "step_size_up": 2,
                                             "cycle_momentum": True}, interval=2),
               lambda o: L.CyclicLR(o, base_lr=[0.01, 0.001], max_lr=[0.1, 0.01], step_size_up=2, cycle_momentum=True)),
    "Adagrad": Opt(torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
                   ps.SchedulerSpec("ExponentialLR", {"gamma": 0.9}),
                   lambda o: L.ExponentialLR(o, gamma=0.9)),
    "Adafactor": Opt(torch.optim.Adafactor, {"lr": 0.01, "weight_decay": 0.01},
                     ps.SchedulerSpec("LinearLR", {"start_factor": 0.5, "total_iters": 8}),
                     lambda o: L.LinearLR(o, start_factor=0.5, total_iters=8)),
    "ASGD": Opt(torch.optim.ASGD, {"lr": 0.05, "t0": 3, "lambd": 1e-3},
                ps.SchedulerSpec("StepLR", {"step_size": 3, "gamma": 0.5}),
                lambda o: L.StepLR(o, step_size=3, gamma=0.5)),
}

LAYOUTS = {
    "whole-named": (None, True),
    "whole-unnamed": (None, False),
    "split-named": (64, True),
    "split-unnamed": (64, False),
}


def make_engine(opt: Opt, model: torch.nn.Module, named: bool, split: int | None, *, shards: int = 3,
                workers: int = WORKERS, nonfinite: str = "skip", clip: ps.ClipConfig | None = None,
                scheduler: bool = True) -> ps.StepEngine:
    config = ps.JobConfig(num_workers=workers, split_threshold_bytes=split,
                          nonfinite=nonfinite, clip=clip or ps.ClipConfig())  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = ps.StepEngine(build_params(model, named), opt.cls, config=config, num_shards=shards,
                               scheduler=opt.spec if scheduler else None, **opt.kwargs)
    elementwise = opt.cls is not torch.optim.Adafactor
    if split is not None:
        # elementwise optimizers cut big tensors across shards; Adafactor keeps them whole and says so
        assert any(engine.plan.is_split(p.index) for p in engine.plan.params) == elementwise
        assert any("not elementwise" in str(w.message) for w in caught) != elementwise
    else:
        assert not any(engine.plan.is_split(p.index) for p in engine.plan.params)
    return engine


def make_reference(opt: Opt, model: torch.nn.Module, named: bool, clip: ps.ClipConfig | None = None,
                   scheduler: bool = True) -> Reference:
    return Reference(build_params(model, named), opt.cls, opt.kwargs, clip=clip or ps.ClipConfig(),
                     scheduler=opt.reference if scheduler else None, interval=opt.spec.interval)


def assert_weights_equal(engine: ps.StepEngine, ref: Reference, where: str) -> None:
    for i, (a, b) in enumerate(zip(engine.parameters(), ref.params, strict=True)):
        same = torch.equal(a, b.detach())
        assert same, f"{where}: parameter {i} differs, max diff {(a - b.detach()).abs().max().item()}"


def assert_engine_matches(engine: ps.StepEngine, ref: Reference, where: str) -> None:
    assert_weights_equal(engine, ref, where)
    sd = engine.state_dict()
    assert_state_equal(sd["optimizer"], ref.optimizer.state_dict(), path=f"{where} optimizer")
    if ref.scheduler is not None:
        assert_state_equal(sd["scheduler"], ref.scheduler.state_dict(), path=f"{where} scheduler")


def model_state(ref: Reference, model: torch.nn.Module, named: bool) -> dict[Any, torch.Tensor]:
    """The model state dict the engine uses: names, or positions in torch's (group order) numbering."""
    return dict(model.state_dict()) if named else {i: p.detach() for i, p in enumerate(ref.params)}


def checkpoint(obj: Any) -> Any:
    """Save and load ``obj`` through ``torch.save``, as a checkpoint file would carry it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(engine: ps.StepEngine, ref: Reference | None, steps: range, engine_offset: int = 0, seed: int = 1,
          check: bool = True) -> None:
    """Push steps ``steps`` (the engine numbers them from ``engine_offset`` less) to both, checking weights."""
    for t in steps:
        grads = worker_grads(ref.params if ref is not None else engine.parameters(), t, engine.config.num_workers, seed)
        result = push_step(engine, t - engine_offset, grads)
        assert not result.skipped
        if ref is not None:
            ref.step(grads)
            if check:
                assert_weights_equal(engine, ref, f"step {t}")


# -- export from the engine, continue locally --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_export_parity(name: str, layout: str) -> None:
    opt = OPTIMIZERS[name]
    split, named = LAYOUTS[layout]
    engine = make_engine(opt, make_model(seed=3), named, split)
    ref = make_reference(opt, make_model(seed=3), named)
    train(engine, ref, range(N))
    assert_engine_matches(engine, ref, f"after {N} steps")

    sd = checkpoint(engine.state_dict())
    local_model = make_model(seed=8)  # other initial weights: everything comes from the state dict
    local = make_reference(opt, local_model, named)
    if named:
        local_model.load_state_dict(sd["model"])
    else:
        assert set(sd["model"]) == set(range(len(local.params)))
        with torch.no_grad():
            for i, p in enumerate(local.params):
                p.copy_(sd["model"][i])
    local.optimizer.load_state_dict(sd["optimizer"])
    local.scheduler.load_state_dict(sd["scheduler"])
    local.applied = N
    assert_engine_matches(engine, local, "after loading the export locally")

    for t in range(N, N + M):
        grads = worker_grads(local.params, t, WORKERS, seed=1)
        push_step(engine, t, grads)
        local.step(grads)
        ref.step(grads)
        assert_weights_equal(engine, local, f"step {t}")
    assert_engine_matches(engine, local, "end")
    assert_engine_matches(engine, ref, "end (reference trained from the start)")


# -- a local optimizer's state into a fresh engine ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_import_parity(name: str, layout: str) -> None:
    opt = OPTIMIZERS[name]
    split, named = LAYOUTS[layout]
    local_model = make_model(seed=3)
    local = make_reference(opt, local_model, named)
    for t in range(N):
        local.step(worker_grads(local.params, t, WORKERS, seed=1))
    saved = {"model": model_state(local, local_model, named), "optimizer": local.optimizer.state_dict(),
             "scheduler": local.scheduler.state_dict()}

    engine = make_engine(opt, make_model(seed=8), named, split)  # other initial weights
    engine.load_state_dict(checkpoint(saved))
    assert_engine_matches(engine, local, "after loading")
    assert_state_equal(engine.state_dict()["model"], saved["model"], path="model")
    assert engine.version == 0  # the engine numbers its own steps from 0

    train(engine, local, range(N, N + M), engine_offset=N)
    assert_engine_matches(engine, local, "end")


@pytest.mark.parametrize("layout", ["whole-named", "split-unnamed"])
@pytest.mark.parametrize("name", ["Adam", "SGD", "ASGD"])
def test_import_parity_from_live_optimizer(name: str, layout: str) -> None:
    """``engine.load_state_dict(opt.state_dict())`` straight from a live local optimizer, which then keeps
    training: the engine must hold its own copy of the state, not the caller's tensors."""
    opt = OPTIMIZERS[name]
    split, named = LAYOUTS[layout]
    local_model = make_model(seed=3)
    local = make_reference(opt, local_model, named)
    for t in range(N):
        local.step(worker_grads(local.params, t, WORKERS, seed=1))
    engine = make_engine(opt, make_model(seed=8), named, split)
    engine.load_state_dict({"model": model_state(local, local_model, named),
                            "optimizer": local.optimizer.state_dict(), "scheduler": local.scheduler.state_dict()})
    train(engine, local, range(N, N + M), engine_offset=N)
    assert_engine_matches(engine, local, "end")


def test_import_parity_partial_and_single_group() -> None:
    """Any of the three parts may be loaded alone; one param group; no scheduler."""
    opt = OPTIMIZERS["Adam"]
    local_model = make_model(seed=3)
    local = Reference(local_model.named_parameters(), opt.cls, opt.kwargs)
    for t in range(N):
        local.step(worker_grads(local.params, t, 1, seed=2))
    config = ps.JobConfig(num_workers=1, split_threshold_bytes=None)
    engine = ps.StepEngine(make_model(seed=8).named_parameters(), opt.cls, config=config, num_shards=2, **opt.kwargs)
    engine.load_state_dict({"model": local_model.state_dict()})
    engine.load_state_dict({"optimizer": checkpoint(local.optimizer.state_dict())})
    engine.load_state_dict({"scheduler": None})
    assert engine.state_dict()["scheduler"] is None
    before = engine.state_dict()
    with pytest.raises(ValueError):  # this job has no scheduler
        engine.load_state_dict({"model": {k: v + 1 for k, v in local_model.state_dict().items()}, "scheduler": {"last_epoch": 3}})
    assert_state_equal(engine.state_dict(), before)
    for t in range(N, N + M):
        grads = worker_grads(local.params, t, 1, seed=2)
        push_step(engine, t - N, grads)
        local.step(grads)
    assert_engine_matches(engine, local, "end")


# -- bad load_state_dict input -----------------------------------------------------------------------------


def _bad_state_dicts(good: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variants of ``good`` (a complete, valid state dict unlike the engine's own) with one thing wrong."""

    def variant(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        sd = copy.deepcopy(good)
        fn(sd)
        return sd

    model_keys = list(good["model"])
    whole, split = "3.weight", "0.weight"  # LayerNorm weight (44 bytes) stays whole; the first Linear's is cut
    index = {k: i for i, k in enumerate(model_keys)}

    def rename(sd: dict[str, Any]) -> None:
        sd["model"]["0.weights"] = sd["model"].pop("0.weight")

    def opt_state_shape(key: str) -> Callable[[dict[str, Any]], None]:
        def fn(sd: dict[str, Any]) -> None:
            st = sd["optimizer"]["state"][index[key]]
            st["exp_avg"] = torch.zeros(st["exp_avg"].numel() + 1)
        return fn

    def one_group(sd: dict[str, Any]) -> None:
        g0, g1 = sd["optimizer"]["param_groups"]
        g0["params"] = g0["params"] + g1["params"]
        g0["param_names"] = g0["param_names"] + g1["param_names"]
        sd["optimizer"]["param_groups"] = [g0]

    def three_groups(sd: dict[str, Any]) -> None:
        g0, g1 = sd["optimizer"]["param_groups"]
        g2 = copy.deepcopy(g1)
        g1["params"], g2["params"] = g1["params"][:2], g1["params"][2:]
        g1["param_names"], g2["param_names"] = g1["param_names"][:2], g1["param_names"][2:]
        sd["optimizer"]["param_groups"] = [g0, g1, g2]

    def drop_from_group(sd: dict[str, Any]) -> None:
        g1 = sd["optimizer"]["param_groups"][1]
        dropped = g1["params"].pop()
        g1["param_names"].pop()
        sd["optimizer"]["state"].pop(dropped, None)

    def state_for_unknown_id(sd: dict[str, Any]) -> None:
        sd["optimizer"]["state"][99] = copy.deepcopy(sd["optimizer"]["state"][0])

    return {
        "model-wrong-key": variant(rename),
        "model-missing-param": variant(lambda sd: sd["model"].pop("4.bias")),
        "model-extra-param": variant(lambda sd: sd["model"].__setitem__("9.weight", torch.zeros(3))),
        "model-wrong-shape": variant(lambda sd: sd["model"].__setitem__("2.weight", sd["model"]["2.weight"].t())),
        "model-wrong-shape-flat": variant(lambda sd: sd["model"].__setitem__("0.weight", sd["model"]["0.weight"].reshape(-1))),
        "model-integer-tensor": variant(lambda sd: sd["model"].__setitem__("0.bias", sd["model"]["0.bias"].long())),
        "model-not-a-tensor": variant(lambda sd: sd["model"].__setitem__("0.bias", [0.0] * 17)),
        "optimizer-state-wrong-shape-split": variant(opt_state_shape(split)),
        "optimizer-state-wrong-shape-whole": variant(opt_state_shape(whole)),
        "optimizer-one-group": variant(one_group),
        "optimizer-three-groups": variant(three_groups),
        "optimizer-missing-param": variant(drop_from_group),
        "optimizer-state-unknown-param": variant(state_for_unknown_id),
        "optimizer-no-state-key": variant(lambda sd: sd["optimizer"].pop("state")),
        "optimizer-duplicate-param": variant(
            lambda sd: sd["optimizer"]["param_groups"][1]["params"].__setitem__(0, sd["optimizer"]["param_groups"][0]["params"][0])),
        "scheduler-not-a-dict": variant(lambda sd: sd.__setitem__("scheduler", 5)),
        "unknown-top-level-key": variant(lambda sd: sd.__setitem__("optimiser", sd["optimizer"])),
        "unknown-top-level-key-only": {"weights": copy.deepcopy(good["model"])},
    }


@functools.lru_cache(maxsize=1)
def _good_other_state_cached() -> dict[str, Any]:
    other = make_engine(OPTIMIZERS["Adam"], make_model(seed=21), True, 64)
    train(other, None, range(N + 2), seed=4)
    return other.state_dict()


def _good_other_state() -> dict[str, Any]:
    """A valid state dict of the job in ``test_load_state_dict_bad_input`` that differs from that engine's own
    in every part (weights, optimizer state, scheduler), so a partial load would show."""
    return copy.deepcopy(_good_other_state_cached())


BAD_LOADS = [
    "model-wrong-key", "model-missing-param", "model-extra-param", "model-wrong-shape", "model-wrong-shape-flat",
    "model-integer-tensor", "model-not-a-tensor", "optimizer-state-wrong-shape-split",
    "optimizer-state-wrong-shape-whole", "optimizer-one-group", "optimizer-three-groups", "optimizer-missing-param",
    "optimizer-state-unknown-param", "optimizer-no-state-key", "optimizer-duplicate-param", "scheduler-not-a-dict",
    "unknown-top-level-key", "unknown-top-level-key-only",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_LOADS)
def test_bad_load_parity_changes_nothing(case: str) -> None:
    opt = OPTIMIZERS["Adam"]
    engine = make_engine(opt, make_model(seed=3), True, 64)
    ref = make_reference(opt, make_model(seed=3), True)
    train(engine, ref, range(3))
    variants = _bad_state_dicts(_good_other_state())
    assert sorted(variants) == sorted(BAD_LOADS)
    bad = variants[case]
    before = engine.state_dict()
    with pytest.raises(ValueError):
        engine.load_state_dict(bad)
    assert_state_equal(engine.state_dict(), before, path=case)
    assert engine.version == 3
    # the engine still trains exactly as before
    train(engine, ref, range(3, 6))
    assert_engine_matches(engine, ref, "after the refused load")


def test_bad_load_parity_source_state_loads() -> None:
    """The valid state the bad-input cases are built from does load, and then the engine equals its source."""
    good = _good_other_state()
    engine = make_engine(OPTIMIZERS["Adam"], make_model(seed=3), True, 64)
    engine.load_state_dict(copy.deepcopy(good))
    assert_state_equal(engine.state_dict(), good)


# -- non-finite gradients ----------------------------------------------------------------------------------


def _poison(grads: list[list[torch.Tensor]], worker: int, value: float, param: int = 2) -> list[list[torch.Tensor]]:
    out = [[g.clone() for g in gs] for gs in grads]
    out[worker][param].view(-1)[3] = value
    return out


PLATEAU = Opt(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9},
              ps.SchedulerSpec("ReduceLROnPlateau", {"patience": 0, "factor": 0.5}, interval=2),
              lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5))


def _metrics(step: int) -> list[float]:
    base = 1.0 / (1 + step) if step < 4 else 0.2 + 0.02 * step  # falls, then rises: the lr is reduced
    return [base + 0.125 * w for w in range(WORKERS)]


@pytest.mark.parametrize(
    "name,clip,split",
    [("Adam", None, 64), ("SGD", ps.ClipConfig(max_norm=1.0), None),
     ("ASGD", ps.ClipConfig(max_norm=0.5, norm_type=float("inf")), 64), ("plateau", None, 64)],
    ids=["Adam-split", "SGD-clip", "ASGD-split-clip-inf", "ReduceLROnPlateau-interval2"],
)
def test_nonfinite_skip_parity(name: str, clip: ps.ClipConfig | None, split: int | None) -> None:
    """A step with an inf or nan in one worker's gradient is skipped whole; the reference simply skips it
    (its metrics too: ReduceLROnPlateau averages the metrics of the applied steps of its interval)."""
    opt = PLATEAU if name == "plateau" else OPTIMIZERS[name]
    plateau = name == "plateau"
    engine = make_engine(opt, make_model(seed=3), True, split, clip=clip)
    ref = make_reference(opt, make_model(seed=3), True, clip=clip)
    bad_steps = {3: (1, float("inf")), 4: (0, float("nan")), 7: (2, float("-inf"))}  # step: (worker, value)
    lrs = []
    for t in range(12):
        grads = worker_grads(ref.params, t, WORKERS, seed=1)
        metrics = [m * 10 for m in _metrics(t)] if plateau and t in bad_steps else _metrics(t) if plateau else None
        if t in bad_steps:
            worker, value = bad_steps[t]
            before = engine.state_dict()
            result = push_step(engine, t, _poison(grads, worker, value), metrics)
            assert result.skipped and result.step == t
            assert result.lrs == [g["lr"] for g in ref.optimizer.param_groups]
            assert_state_equal(engine.state_dict(), before, path=f"skipped step {t}")
            assert engine.version == t + 1
            continue  # the reference simply skips this step
        result = push_step(engine, t, grads, metrics)
        ref.step(grads, sum(metrics) / len(metrics) if metrics else None)
        assert not result.skipped
        assert_weights_equal(engine, ref, f"step {t}")
        lrs.append(engine.get_last_lr())
    assert engine.skipped_steps == len(bad_steps)
    assert_engine_matches(engine, ref, "end")
    assert len({tuple(x) for x in lrs}) > 1  # the scheduler did change the lrs


@pytest.mark.parametrize("split", [None, 64], ids=["whole", "split"])
def test_nonfinite_error_parity(split: int | None) -> None:
    opt = OPTIMIZERS["Adam"]
    engine = make_engine(opt, make_model(seed=3), True, split, nonfinite="error")
    ref = make_reference(opt, make_model(seed=3), True)
    assert issubclass(NonFiniteGradientError, ValueError)
    for t in range(6):
        grads = worker_grads(ref.params, t, WORKERS, seed=1)
        if t in (2, 4):
            if t == 4:  # the first push of the step is the bad one
                before = engine.state_dict()
                with pytest.raises(NonFiniteGradientError):
                    engine.push(0, t, _poison(grads, 0, float("nan"), param=0)[0])
                assert_state_equal(engine.state_dict(), before)
            assert engine.push(0, t, grads[0]) is None
            before = engine.state_dict()
            for value in (float("inf"), float("nan")):
                with pytest.raises(NonFiniteGradientError):
                    engine.push(1, t, _poison(grads, 1, value)[1])
                assert_state_equal(engine.state_dict(), before)
                assert engine.version == t
            # the same worker pushes finite gradients for the step, which then closes as usual
            assert engine.push(1, t, grads[1]) is None
            result = engine.push(2, t, grads[2])
        else:
            result = push_step(engine, t, grads)
        assert result is not None and not result.skipped and result.step == t
        ref.step(grads)
        assert_weights_equal(engine, ref, f"step {t}")
    assert engine.skipped_steps == 0
    assert_engine_matches(engine, ref, "end")


# -- bad pushes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_bad_push_parity(named: bool) -> None:
    opt = OPTIMIZERS["SGD"]
    model = make_model(seed=3)
    engine = make_engine(opt, model, named, 64)
    ref = make_reference(opt, make_model(seed=3), named)
    keys = [p.key for p in engine.plan.params]
    train(engine, ref, range(2))

    t = 2
    grads = worker_grads(ref.params, t, WORKERS, seed=1)
    assert engine.push(0, t, grads[0]) is None
    before = engine.state_dict()

    def as_map(gs: list[torch.Tensor]) -> dict[Any, torch.Tensor]:
        return dict(zip(keys, gs))

    g1 = grads[1]
    bad: dict[str, tuple[Callable[[], Any], type]] = {
        "worker too big": (lambda: engine.push(WORKERS, t, g1), ValueError),
        "worker negative": (lambda: engine.push(-1, t, g1), ValueError),
        "worker a str": (lambda: engine.push("1", t, g1), ValueError),  # type: ignore[arg-type]
        "worker a float": (lambda: engine.push(1.0, t, g1), ValueError),  # type: ignore[arg-type]
        "stale step": (lambda: engine.push(1, t - 1, g1), StaleStepError),
        "long stale step": (lambda: engine.push(1, 0, g1), StaleStepError),
        "future step": (lambda: engine.push(1, t + 1, g1), FutureStepError),
        "wrong shape": (lambda: engine.push(1, t, [g1[0].t(), *g1[1:]]), ValueError),
        "wrong shape flat": (lambda: engine.push(1, t, [g.reshape(-1) for g in g1]), ValueError),
        "scalar for vector": (lambda: engine.push(1, t, [*g1[:-2], g1[-2].sum(), g1[-1]]), ValueError),
        "one grad too few": (lambda: engine.push(1, t, g1[:-1]), ValueError),
        "one grad too many": (lambda: engine.push(1, t, [*g1, g1[-1]]), ValueError),
        "no grads": (lambda: engine.push(1, t, []), ValueError),
        "integer grad": (lambda: engine.push(1, t, [g1[0].long(), *g1[1:]]), ValueError),
        "not a tensor": (lambda: engine.push(1, t, [g1[0].tolist(), *g1[1:]]), ValueError),
        "missing name": (lambda: engine.push(1, t, {k: g for k, g in as_map(g1).items() if k != keys[4]}), ValueError),
        "unknown name": (lambda: engine.push(1, t, {**as_map(g1), "nope": g1[0]}), ValueError),
        "renamed": (lambda: engine.push(1, t, {("x" if k == keys[0] else k): g for k, g in as_map(g1).items()}), ValueError),
        "metric not a number": (lambda: engine.push(1, t, g1, metric="0.5"), ValueError),  # type: ignore[arg-type]
    }
    for what, (call, error) in bad.items():
        with pytest.raises(error):
            call()
        assert issubclass(error, ValueError)
        assert_state_equal(engine.state_dict(), before, path=what)
        assert engine.version == t, what

    # a repeated push of (worker 0, step t) is ignored, even with other gradients: not counted twice
    assert engine.push(0, t, grads[0]) is None
    assert engine.push(0, t, [g * 100 for g in grads[1]]) is None
    assert_state_equal(engine.state_dict(), before)
    # worker 1 pushes by name, and the step closes with the gradients of the first pushes
    assert engine.push(1, t, as_map(grads[1])) is None
    assert engine.push(1, t, grads[0]) is None
    result = engine.push(2, t, grads[2])
    assert result is not None and result.step == t and not result.skipped
    ref.step(grads)
    assert_weights_equal(engine, ref, f"step {t}")
    # a push for the closed step is now stale, also for the workers who pushed it
    for w in range(WORKERS):
        with pytest.raises(StaleStepError):
            engine.push(w, t, grads[w])

    train(engine, ref, range(t + 1, t + 4))
    assert_engine_matches(engine, ref, "end")
    assert engine.version == t + 4 and engine.skipped_steps == 0
