"""Turn the names of optimizers, schedulers and lr lambdas into the objects they stand for.

A name is either a short name from ``torch.optim`` / ``torch.optim.lr_scheduler`` ("Adam", "StepLR") or an
import path "package.module:Attribute". An import path runs that module's code, so it is allowed only from
the server's ``trusted_modules``. Objects (classes, callables) handed over in-process are the caller's own
code and are taken as they are; only names can arrive from the network.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import lr_scheduler

# Optimizers whose update of each element depends only on that element's own gradient and state, so a
# tensor may be cut into pieces on several shards without changing the result.
ELEMENTWISE_OPTIMIZERS: frozenset[type] = frozenset(
    {
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.RMSprop,
        torch.optim.Adagrad,
        torch.optim.Adadelta,
        torch.optim.ASGD,
        torch.optim.Rprop,
    }
)

# What the service cannot run, and why: it has no closure to re-evaluate and no sparse gradients.
UNSUPPORTED_OPTIMIZERS: dict[str, str] = {
    "LBFGS": "LBFGS needs a closure that re-evaluates the model, which a parameter server cannot call",
    "SparseAdam": "SparseAdam needs sparse gradients; the service aggregates dense gradients",
}


def _public_classes(module: Any, base: type) -> dict[str, type]:
    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, base) and not name.startswith("_") and obj is not base
    }


def _is_trusted(module_name: str, trusted_modules: Iterable[str]) -> bool:
    return any(module_name == t or module_name.startswith(t + ".") for t in trusted_modules)


def import_trusted(path: str, trusted_modules: Iterable[str], what: str) -> Any:
    """Import "package.module:Attribute", refusing modules that are not trusted."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} import path must look like 'package.module:Name', got {path!r}")
    if not _is_trusted(module_name, trusted_modules):
        raise ValueError(
            f"{what} {path!r} is not allowed: module {module_name!r} is not in trusted_modules "
            f"{sorted(trusted_modules)!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {path!r}: cannot import module {module_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _lookup(spec: Any, known: dict[str, type], base: type, what: str, trusted_modules: Iterable[str]) -> type:
    if isinstance(spec, type):
        cls = spec
    elif isinstance(spec, str) and ":" in spec:
        cls = import_trusted(spec, trusted_modules, what)
    elif isinstance(spec, str):
        if spec not in known:
            lowered = {name.lower(): name for name in known}
            close = [lowered[m] for m in difflib.get_close_matches(spec.lower(), lowered, n=3)]
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown {what} {spec!r}{hint} (known: {', '.join(sorted(known))})")
        cls = known[spec]
    else:
        raise ValueError(f"{what} must be a class, a name or 'package.module:Class', got {spec!r}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{what} {spec!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    return cls


def resolve_optimizer(spec: Any, trusted_modules: Iterable[str] = ()) -> type[torch.optim.Optimizer]:
    known = _public_classes(torch.optim, torch.optim.Optimizer)
    cls = _lookup(spec, known, torch.optim.Optimizer, "optimizer", tuple(trusted_modules))
    if cls.__name__ in UNSUPPORTED_OPTIMIZERS and known.get(cls.__name__) is cls:
        raise ValueError(f"optimizer {cls.__name__} is not supported: {UNSUPPORTED_OPTIMIZERS[cls.__name__]}")
    return cls


def resolve_scheduler(spec: Any, trusted_modules: Iterable[str] = ()) -> type[lr_scheduler.LRScheduler]:
    known = _public_classes(lr_scheduler, lr_scheduler.LRScheduler)
    return _lookup(spec, known, lr_scheduler.LRScheduler, "scheduler", tuple(trusted_modules))


def resolve_callable(spec: Any, trusted_modules: Iterable[str], what: str) -> Callable[..., Any]:
    """A callable given in-process, or named by a trusted import path."""
    if isinstance(spec, str):
        obj = import_trusted(spec, trusted_modules, what)
    else:
        obj = spec
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable")
    return obj


def is_elementwise(optimizer_cls: type) -> bool:
    return optimizer_cls in ELEMENTWISE_OPTIMIZERS
