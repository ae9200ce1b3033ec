"""Configuration: one tree of dataclasses, the single source of every option and of its default.

- ``JobConfig``: what a job's step does (optimizer, groups, clipping, scheduler, workers, ...). The same tree
  is behind ``StepEngine``, ``RemoteOptimizer``'s keyword arguments (``REMOTE_OPTIMIZER_KWARGS``), the
  ``JobConfig`` proto (``paramserver.wire.jobconfig`` converts; a field a client leaves out takes the
  default written here) and the CLI.
- ``ServerConfig`` and ``RayConfig``: how the service runs (``serve()``, ``serve_local()``, ``paramserver
  serve``'s flags are made from their fields).

User errors raise ``ValueError`` naming the field when the dataclass is built, so a bad config never reaches a
shard. Defaults are torch's where torch has one (``norm_type=2.0``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

NonFinitePolicy = Literal["skip", "error"]

# Tensors above this size are cut into contiguous pieces across shards, for elementwise optimizers only.
DEFAULT_SPLIT_THRESHOLD_BYTES = 32 * 2**20
# The wire's chunk size (measured: see BENCHMARKS.md) and message limit.
DEFAULT_CHUNK_BYTES = 1 * 2**20
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
GRAD_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer every shard runs over its slice of the parameters."""

    name: Any = "SGD"
    """A ``torch.optim`` class, its name ("Adam"), or "package.module:Class" from a trusted module."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the optimizer's constructor (``lr``, ``betas``, ...), as torch takes them."""

    def __post_init__(self) -> None:
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"optimizer kwargs must be a dict, got {type(self.kwargs).__name__}")
        if "params" in self.kwargs:
            raise ValueError("optimizer kwargs must not hold 'params': parameters are given on their own")


@dataclass(frozen=True)
class ClipConfig:
    """Global gradient clipping, as ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` do it."""

    max_norm: float | None = None
    """Clip the total norm of all gradients to this (``clip_grad_norm_``); None: no norm clipping (the total
    norm is still computed and reported every step)."""
    norm_type: float = 2.0
    """Order of the norm, as ``clip_grad_norm_``'s ``norm_type`` (``inf`` for the max norm)."""
    error_if_nonfinite: bool = False
    """As ``clip_grad_norm_``: a non-finite total norm raises on the workers (the step is not applied)."""
    clip_value: float | None = None
    """Clamp every averaged gradient to [-clip_value, clip_value] first (``clip_grad_value_``); None: no clamp."""

    def __post_init__(self) -> None:
        norm_type = float(self.norm_type)
        if math.isnan(norm_type):
            raise ValueError("clip norm_type must be a number or inf, got nan")
        object.__setattr__(self, "norm_type", norm_type)
        if self.max_norm is not None and not (float(self.max_norm) >= 0.0):
            raise ValueError(f"clip max_norm must be >= 0, got {self.max_norm}")
        if self.clip_value is not None and not (float(self.clip_value) >= 0.0):
            raise ValueError(f"clip clip_value must be >= 0, got {self.clip_value}")


@dataclass(frozen=True)
class SchedulerSpec:
    """An LR scheduler to run once, globally, over the job's param groups."""

    scheduler: Any
    """A class of ``torch.optim.lr_scheduler``, its name ("StepLR"), or "pkg.mod:Class" from a trusted module."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Its constructor's arguments. ``lr_lambda`` may be an import path ("pkg.mod:fn", or a list of them), and
    ``schedulers`` (SequentialLR, ChainedScheduler) a list of ``SchedulerSpec`` or ``(scheduler, kwargs)``."""
    interval: int = 1
    """The scheduler steps after every ``interval``-th applied optimizer step."""

    def __post_init__(self) -> None:
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(f"scheduler interval must be an integer >= 1, got {self.interval!r}")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"scheduler kwargs must be a dict, got {type(self.kwargs).__name__}")


@dataclass(frozen=True)
class JobConfig:
    """Every option of a job. The parameters themselves (shapes, dtypes, names) are not options: they come
    with the model."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer and its keyword arguments."""
    groups: tuple[dict[str, Any], ...] = ()
    """Each param group's own options (torch's param-group dict without "params"), in group order; filled in
    from the params the job is built with."""
    clip: ClipConfig = field(default_factory=ClipConfig)
    """Global clipping of the averaged gradients."""
    scheduler: SchedulerSpec | None = None
    """The LR scheduler, or None."""
    num_workers: int = 1
    """Data-parallel workers the job starts with (ranks 0 .. num_workers-1); each step averages the gradients
    of the live members that pushed it."""
    max_workers: int | None = None
    """Ranks below this may join (also mid-run, at the next step boundary); None: ``num_workers``."""
    min_workers: int = 1
    """Below this many live members, steps wait (with a deadline) for workers to join."""
    lease_timeout: float = 30.0
    """Seconds a member stays without renewing its lease (every call of a worker renews it; RemoteOptimizer
    also renews it in the background): then it is dropped, and the steps no longer wait for it."""
    mode: str = "sync"
    """"sync": each step averages the members' gradients (see ``close_after``); "async": every push is applied as
    soon as every shard holds it, as one optimizer step on that worker's gradient (clipped by its own norm; the
    scheduler steps once per applied update), and ``step()`` returns with the latest weights."""
    max_staleness: int | None = None
    """With ``mode="async"``: bounded staleness (SSP, Ho et al. 2013): a worker more than this many updates ahead
    of the slowest live member waits in ``step()``; None: no bound. 0 is bulk synchronous: the same training as
    ``mode="sync"``."""
    staleness_lr: bool = False
    """With ``mode="async"``: each update's learning rates divided by its staleness (Zhang et al. 2016)."""
    close_after: int | None = None
    """Backup workers (Chen et al. 2016): a step closes on the first ``close_after`` members' pushes (all members
    when fewer are live) and averages over them; a late push is not applied, its worker just pulls the new
    weights. None: synchronous steps, every live member."""
    nonfinite: NonFinitePolicy = "skip"
    """A gradient with inf or nan: "skip" the step like ``torch.amp.GradScaler`` (weights, state and scheduler
    unchanged, counted), or "error": refuse the push."""
    deterministic: bool = True
    """Sum the workers' gradients in rank order, so the result does not depend on arrival order."""
    split_threshold_bytes: int | None = DEFAULT_SPLIT_THRESHOLD_BYTES
    """Tensors above this many bytes are cut into pieces across shards (elementwise optimizers only); None:
    never cut."""
    grad_dtype: torch.dtype | None = None
    """The dtype gradients travel in (float32, bfloat16, float16); None: the parameters' own. Shards
    accumulate in the parameters' dtype."""

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(f"optimizer must be an OptimizerConfig, got {type(self.optimizer).__name__}")
        if not isinstance(self.clip, ClipConfig):
            raise ValueError(f"clip must be a ClipConfig, got {type(self.clip).__name__}")
        if self.scheduler is not None and not isinstance(self.scheduler, SchedulerSpec):
            raise ValueError(f"scheduler must be a SchedulerSpec or None, got {type(self.scheduler).__name__}")
        groups = tuple(dict(g) for g in self.groups)
        if any("params" in g for g in groups):
            raise ValueError("group options must not hold 'params'")
        object.__setattr__(self, "groups", groups)
        if not _is_int(self.num_workers) or self.num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        if self.max_workers is not None and (not _is_int(self.max_workers) or self.max_workers < self.num_workers):
            raise ValueError(f"max_workers must be None or an integer >= num_workers ({self.num_workers}), got {self.max_workers!r}")
        if not _is_int(self.min_workers) or not 1 <= self.min_workers <= self.workers_limit:
            raise ValueError(f"min_workers must be an integer in [1, {self.workers_limit}], got {self.min_workers!r}")
        if isinstance(self.lease_timeout, bool) or not isinstance(self.lease_timeout, (int, float)) or not self.lease_timeout > 0:
            raise ValueError(f"lease_timeout must be a number of seconds > 0, got {self.lease_timeout!r}")
        if self.close_after is not None and (not _is_int(self.close_after) or not 1 <= self.close_after <= self.workers_limit):
            raise ValueError(f"close_after must be None or an integer in [1, {self.workers_limit}], got {self.close_after!r}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if self.max_staleness is not None and (not _is_int(self.max_staleness) or self.max_staleness < 0):
            raise ValueError(f"max_staleness must be None or an integer >= 0, got {self.max_staleness!r}")
        if not isinstance(self.staleness_lr, bool):
            raise ValueError(f"staleness_lr must be a bool, got {self.staleness_lr!r}")
        if self.mode == "sync" and (self.max_staleness is not None or self.staleness_lr):
            raise ValueError('max_staleness and staleness_lr need mode="async"')
        if self.mode == "async" and self.close_after is not None:
            raise ValueError('close_after is a rule of synchronous steps; mode="async" applies every push on its own')
        if self.mode == "async" and not self.deterministic:
            raise ValueError('mode="async" needs deterministic=True: a shard keeps each push until its own update')
        if self.close_after is not None and not self.deterministic:
            raise ValueError("close_after needs deterministic=True: a late worker's push must be left out of the step's sum")
        if self.nonfinite not in ("skip", "error"):
            raise ValueError(f"nonfinite must be 'skip' or 'error', got {self.nonfinite!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be a bool, got {self.deterministic!r}")
        if self.split_threshold_bytes is not None and (not _is_int(self.split_threshold_bytes) or self.split_threshold_bytes < 1):
            raise ValueError(f"split_threshold_bytes must be a positive integer or None, got {self.split_threshold_bytes!r}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise ValueError(f"grad_dtype must be None (the parameters' dtype), float32, bfloat16 or float16, got {self.grad_dtype}")

    @property
    def step_mode(self) -> str:
        """How steps run: ``mode``, except that asynchronous steps bounded to staleness 0 are synchronous steps
        (bulk synchronous parallel, SSP's s=0): every member's gradient of a version, averaged into one update."""
        return "sync" if self.mode == "async" and self.max_staleness == 0 else self.mode

    @property
    def workers_limit(self) -> int:
        """How many ranks the job has room for: ``max_workers``, or ``num_workers``."""
        return self.num_workers if self.max_workers is None else self.max_workers

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)


# RemoteOptimizer's keyword arguments, torch-style, and where each lives in the tree ("a.b": field b of field
# a). RemoteOptimizer builds its JobConfig from this table, and a test keeps the two in step.
REMOTE_OPTIMIZER_KWARGS: dict[str, str] = {
    "num_workers": "num_workers",
    "max_workers": "max_workers",
    "min_workers": "min_workers",
    "lease_timeout": "lease_timeout",
    "close_after": "close_after",
    "mode": "mode",
    "max_staleness": "max_staleness",
    "staleness_lr": "staleness_lr",
    "clip_grad_norm": "clip.max_norm",
    "norm_type": "clip.norm_type",
    "error_if_nonfinite": "clip.error_if_nonfinite",
    "clip_grad_value": "clip.clip_value",
    "nonfinite": "nonfinite",
    "deterministic": "deterministic",
    "split_threshold_bytes": "split_threshold_bytes",
    "grad_dtype": "grad_dtype",
}


def default_of(path: str) -> Any:
    """The tree's default of the field at ``path`` ("clip.norm_type")."""
    node: Any = JobConfig()
    for name in path.split("."):
        node = getattr(node, name)
    return node


def job_config_from_kwargs(
    optimizer: Any, optimizer_kwargs: dict[str, Any], scheduler: SchedulerSpec | None = None, **kwargs: Any
) -> JobConfig:
    """A JobConfig from torch-style keyword arguments (the names in ``REMOTE_OPTIMIZER_KWARGS``)."""
    unknown = set(kwargs) - set(REMOTE_OPTIMIZER_KWARGS)
    if unknown:
        raise ValueError(f"unknown job options {sorted(unknown)}")
    top: dict[str, Any] = {}
    clip: dict[str, Any] = {}
    for name, value in kwargs.items():
        path = REMOTE_OPTIMIZER_KWARGS[name]
        if path.startswith("clip."):
            clip[path.removeprefix("clip.")] = value
        else:
            top[path] = value
    return JobConfig(optimizer=OptimizerConfig(optimizer, dict(optimizer_kwargs)), clip=ClipConfig(**clip), scheduler=scheduler, **top)


@dataclass(frozen=True)
class TLSConfig:
    """PEM bytes. With ``client_ca`` the server also demands a client certificate signed by it (mTLS)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


@dataclass(frozen=True)
class ServerConfig:
    """How the service's gRPC servers run: the front door (coordinator) and every shard server."""

    num_shards: int = 1
    """Shards the parameters and optimizer state are split across (one server each)."""
    host: str = "127.0.0.1"
    """Address the servers bind (0.0.0.0 for every interface of a node)."""
    port: int = 0
    """The front door's port; 0 picks a free one (``paramserver serve`` defaults to 50051)."""
    trusted_modules: tuple[str, ...] = ()
    """Modules whose optimizers, schedulers and lr lambdas jobs may name by import path."""
    auth_token: str | None = None
    """Bearer token every call must carry; None: no authentication."""
    tls: TLSConfig | None = None
    """TLS (or mTLS) for every server; None: plaintext."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """gRPC message size limit, both directions."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Payload bytes per wire chunk of weights and state."""
    grpc_threads: int = 64
    """Threads for the front door's blocking work (creating jobs, state); waits hold none."""
    metrics_port: int | None = None
    """Expose Prometheus metrics over HTTP on this port (shard actors use any free port); None: do not."""
    checkpoint_dir: str | None = None
    """Directory of the jobs' checkpoints; at start every job found there is restored at its newest valid
    checkpoint. None: no checkpoints."""
    checkpoint_every: int = 0
    """Checkpoint every job every this many steps (needs checkpoint_dir); 0: only on demand."""
    checkpoint_keep: int = 3
    """Checkpoints kept per job; older ones are removed once a newer one is valid."""
    shard_port_base: int | None = None
    """Shard j listens on this port + j on its node (a shard's standby on this port + num_shards + j), so a
    firewall can open them; None: any free port. Workers that reach only the front door need none of them."""

    def __post_init__(self) -> None:
        if not _is_int(self.num_shards) or self.num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {self.num_shards!r}")
        if not _is_int(self.port) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port!r}")
        object.__setattr__(self, "trusted_modules", tuple(self.trusted_modules))
        if not _is_int(self.grpc_threads) or self.grpc_threads < 1:
            raise ValueError(f"grpc_threads must be an integer >= 1, got {self.grpc_threads!r}")
        if not _is_int(self.chunk_bytes) or self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive integer, got {self.chunk_bytes!r}")
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if not _is_int(self.checkpoint_keep) or self.checkpoint_keep < 1:
            raise ValueError(f"checkpoint_keep must be an integer >= 1, got {self.checkpoint_keep!r}")
        if self.shard_port_base is not None and (not _is_int(self.shard_port_base) or not 0 < self.shard_port_base < 65536 - 2 * self.num_shards):
            raise ValueError(f"shard_port_base must be None or a port in (0, {65536 - 2 * self.num_shards}), got {self.shard_port_base!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        if self.chunk_bytes + 4096 > self.max_message_bytes:
            raise ValueError(f"chunk_bytes {self.chunk_bytes} must fit in max_message_bytes {self.max_message_bytes}")


PLACEMENT_STRATEGIES = ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK")


@dataclass(frozen=True)
class RayConfig:
    """Where the service's actors run on Ray (``serve()`` only; ``serve_local()`` has no Ray)."""

    gpus_per_shard: float = 0.0
    """GPUs per shard actor (fractions share a GPU); > 0 puts the shards' state on CUDA."""
    cpus_per_shard: float = 0.5
    """CPUs reserved per shard actor."""
    ray_address: str | None = None
    """None: the Ray this process is connected to, else an embedded local Ray; "auto" or an address joins
    that cluster."""
    placement: str = "SPREAD"
    """Placement-group strategy of the shards: SPREAD, STRICT_SPREAD, PACK or STRICT_PACK."""
    placement_timeout: float = 60.0
    """Seconds to wait for the shards' placement before giving up."""
    replicas: int = 0
    """Standbys per shard: 1 gives each shard a standby (on another node where the cluster has one) that
    applies the same updates and takes over, with no step lost, when the primary dies; 0: a shard that dies
    rolls the jobs back to their newest checkpoint."""
    standby_timeout: float = 10.0
    """Seconds a step waits for a standby beyond its primary (the step's mean handed over, an update applied).
    A standby that does not answer in time (hung, not dead) falls out of sync, so the steps go on without it; it
    is rebuilt from its primary once it answers again."""
    control_lane: bool = True
    """The step's two hot control calls (a shard's report that completes a step, the coordinator's update
    call) go over a Unix socket between processes of one node (Linux), not as Ray actor calls: about 1.5 ms
    less each. Calls between nodes, and every other control call, are Ray's. False: all of them over Ray."""

    def __post_init__(self) -> None:
        if self.replicas not in (0, 1) or isinstance(self.replicas, bool):
            raise ValueError(f"replicas must be 0 or 1, got {self.replicas!r}")
        if self.placement not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {self.placement!r}")
        if not (self.gpus_per_shard >= 0 and self.cpus_per_shard >= 0):
            raise ValueError("gpus_per_shard and cpus_per_shard must be >= 0")
        if not self.placement_timeout > 0:
            raise ValueError(f"placement_timeout must be > 0, got {self.placement_timeout!r}")
        if not self.standby_timeout > 0:
            raise ValueError(f"standby_timeout must be > 0, got {self.standby_timeout!r}")


def split_options(options: dict[str, Any], *configs: type) -> list[dict[str, Any]]:
    """Sort keyword ``options`` by the dataclass that has a field of that name; unknown names are refused."""
    out: list[dict[str, Any]] = [{} for _ in configs]
    for name, value in options.items():
        for i, cls in enumerate(configs):
            if name in {f.name for f in dataclasses.fields(cls)}:
                out[i][name] = value
                break
        else:
            known = sorted(f.name for cls in configs for f in dataclasses.fields(cls))
            raise TypeError(f"unknown option {name!r}; the options are {', '.join(known)}")
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right below it in the class body), for help texts."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
