from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParamSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "group")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    group: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., group: _Optional[int] = ...) -> None: ...

class ClipSettings(_message.Message):
    __slots__ = ("max_norm", "norm_type", "error_if_nonfinite", "clip_value")
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    NORM_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_IF_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    CLIP_VALUE_FIELD_NUMBER: _ClassVar[int]
    max_norm: float
    norm_type: float
    error_if_nonfinite: bool
    clip_value: float
    def __init__(self, max_norm: _Optional[float] = ..., norm_type: _Optional[float] = ..., error_if_nonfinite: _Optional[bool] = ..., clip_value: _Optional[float] = ...) -> None: ...

class JobConfig(_message.Message):
    __slots__ = ("optimizer", "optimizer_kwargs_json", "group_options_json", "params", "num_workers", "clip", "nonfinite", "deterministic", "scheduler_json", "split_threshold_bytes", "grad_dtype", "lease_timeout", "min_workers", "max_workers", "close_after", "mode", "max_staleness", "staleness_lr")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    GROUP_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_JSON_FIELD_NUMBER: _ClassVar[int]
    SPLIT_THRESHOLD_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_AFTER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_LR_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    optimizer_kwargs_json: str
    group_options_json: _containers.RepeatedScalarFieldContainer[str]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    num_workers: int
    clip: ClipSettings
    nonfinite: str
    deterministic: bool
    scheduler_json: str
    split_threshold_bytes: int
    grad_dtype: str
    lease_timeout: float
    min_workers: int
    max_workers: int
    close_after: int
    mode: str
    max_staleness: int
    staleness_lr: bool
    def __init__(self, optimizer: _Optional[str] = ..., optimizer_kwargs_json: _Optional[str] = ..., group_options_json: _Optional[_Iterable[str]] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., num_workers: _Optional[int] = ..., clip: _Optional[_Union[ClipSettings, _Mapping]] = ..., nonfinite: _Optional[str] = ..., deterministic: _Optional[bool] = ..., scheduler_json: _Optional[str] = ..., split_threshold_bytes: _Optional[int] = ..., grad_dtype: _Optional[str] = ..., lease_timeout: _Optional[float] = ..., min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., close_after: _Optional[int] = ..., mode: _Optional[str] = ..., max_staleness: _Optional[int] = ..., staleness_lr: _Optional[bool] = ...) -> None: ...

class SliceInfo(_message.Message):
    __slots__ = ("param", "start", "stop")
    PARAM_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    param: int
    start: int
    stop: int
    def __init__(self, param: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard", "address", "slices")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    address: str
    slices: _containers.RepeatedCompositeFieldContainer[SliceInfo]
    def __init__(self, shard: _Optional[int] = ..., address: _Optional[str] = ..., slices: _Optional[_Iterable[_Union[SliceInfo, _Mapping]]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("job", "config")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    job: str
    config: JobConfig
    def __init__(self, job: _Optional[str] = ..., config: _Optional[_Union[JobConfig, _Mapping]] = ...) -> None: ...

class JoinJobRequest(_message.Message):
    __slots__ = ("job", "rank")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job", "version", "config", "shards", "ready", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    version: int
    config: JobConfig
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    ready: bool
    generation: int
    def __init__(self, job: _Optional[str] = ..., version: _Optional[int] = ..., config: _Optional[_Union[JobConfig, _Mapping]] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., ready: _Optional[bool] = ..., generation: _Optional[int] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("job", "worker", "step", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    step: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportMetricsReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("shard", "address", "version", "pushed_workers", "placement")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUSHED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    shard: int
    address: str
    version: int
    pushed_workers: _containers.RepeatedScalarFieldContainer[int]
    placement: str
    def __init__(self, shard: _Optional[int] = ..., address: _Optional[str] = ..., version: _Optional[int] = ..., pushed_workers: _Optional[_Iterable[int]] = ..., placement: _Optional[str] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step", "total_norm", "clip_coef", "skipped", "lrs", "error", "contributors", "based_on", "staleness")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEF_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    LRS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    BASED_ON_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_norm: float
    clip_coef: float
    skipped: bool
    lrs: _containers.RepeatedScalarFieldContainer[float]
    error: str
    contributors: _containers.RepeatedScalarFieldContainer[int]
    based_on: int
    staleness: int
    def __init__(self, step: _Optional[int] = ..., total_norm: _Optional[float] = ..., clip_coef: _Optional[float] = ..., skipped: _Optional[bool] = ..., lrs: _Optional[_Iterable[float]] = ..., error: _Optional[str] = ..., contributors: _Optional[_Iterable[int]] = ..., based_on: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class MembershipChange(_message.Message):
    __slots__ = ("rank", "reason", "step")
    RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    rank: int
    reason: str
    step: int
    def __init__(self, rank: _Optional[int] = ..., reason: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("job", "version", "num_workers", "members", "shards", "lrs", "skipped_steps", "last_total_norm", "waiting_for", "param_groups_json", "epoch", "last_step", "changes", "transports", "state")
    class TransportsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LRS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_TOTAL_NORM_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    PARAM_GROUPS_JSON_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job: str
    version: int
    num_workers: int
    members: _containers.RepeatedScalarFieldContainer[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    lrs: _containers.RepeatedScalarFieldContainer[float]
    skipped_steps: int
    last_total_norm: float
    waiting_for: str
    param_groups_json: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    last_step: StepReport
    changes: _containers.RepeatedCompositeFieldContainer[MembershipChange]
    transports: _containers.ScalarMap[int, str]
    state: str
    def __init__(self, job: _Optional[str] = ..., version: _Optional[int] = ..., num_workers: _Optional[int] = ..., members: _Optional[_Iterable[int]] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., lrs: _Optional[_Iterable[float]] = ..., skipped_steps: _Optional[int] = ..., last_total_norm: _Optional[float] = ..., waiting_for: _Optional[str] = ..., param_groups_json: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ..., last_step: _Optional[_Union[StepReport, _Mapping]] = ..., changes: _Optional[_Iterable[_Union[MembershipChange, _Mapping]]] = ..., transports: _Optional[_Mapping[int, str]] = ..., state: _Optional[str] = ...) -> None: ...

class LeaveJobRequest(_message.Message):
    __slots__ = ("job", "worker")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ...) -> None: ...

class LeaveJobReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("job", "worker", "transport")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    transport: str
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., transport: _Optional[str] = ...) -> None: ...

class RenewLeaseReply(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("job", "worker", "step", "shard", "buffer", "dtype", "offset", "total", "missing_params", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    step: int
    shard: int
    buffer: int
    dtype: str
    offset: int
    total: int
    missing_params: _containers.RepeatedScalarFieldContainer[int]
    generation: int
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., step: _Optional[int] = ..., shard: _Optional[int] = ..., buffer: _Optional[int] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., missing_params: _Optional[_Iterable[int]] = ..., generation: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ChunkHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ChunkHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("already_applied", "version", "pulled")
    ALREADY_APPLIED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PULLED_FIELD_NUMBER: _ClassVar[int]
    already_applied: bool
    version: int
    pulled: SharedPullReply
    def __init__(self, already_applied: _Optional[bool] = ..., version: _Optional[int] = ..., pulled: _Optional[_Union[SharedPullReply, _Mapping]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job", "shard", "min_version", "worker", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    shard: int
    min_version: int
    worker: int
    generation: int
    def __init__(self, job: _Optional[str] = ..., shard: _Optional[int] = ..., min_version: _Optional[int] = ..., worker: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("job", "worker", "shard", "host")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    shard: int
    host: str
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., shard: _Optional[int] = ..., host: _Optional[str] = ...) -> None: ...

class AttachReply(_message.Message):
    __slots__ = ("host", "grads_segment", "weights_segment", "weights_shared", "offsets", "size")
    HOST_FIELD_NUMBER: _ClassVar[int]
    GRADS_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHARED_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    host: str
    grads_segment: str
    weights_segment: str
    weights_shared: bool
    offsets: _containers.RepeatedScalarFieldContainer[int]
    size: int
    def __init__(self, host: _Optional[str] = ..., grads_segment: _Optional[str] = ..., weights_segment: _Optional[str] = ..., weights_shared: _Optional[bool] = ..., offsets: _Optional[_Iterable[int]] = ..., size: _Optional[int] = ...) -> None: ...

class SharedPush(_message.Message):
    __slots__ = ("job", "worker", "step", "shard", "missing_params", "generation", "pull_min_version")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MISSING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PULL_MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    step: int
    shard: int
    missing_params: _containers.RepeatedScalarFieldContainer[int]
    generation: int
    pull_min_version: int
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., step: _Optional[int] = ..., shard: _Optional[int] = ..., missing_params: _Optional[_Iterable[int]] = ..., generation: _Optional[int] = ..., pull_min_version: _Optional[int] = ...) -> None: ...

class SharedPullReply(_message.Message):
    __slots__ = ("version", "generation")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    version: int
    generation: int
    def __init__(self, version: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class DetachRequest(_message.Message):
    __slots__ = ("job", "worker", "shard")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    shard: int
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., shard: _Optional[int] = ...) -> None: ...

class DetachReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("job", "skeleton_json", "tensor", "dtype", "shape", "offset", "data", "step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SKELETON_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    skeleton_json: str
    tensor: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    step: int
    def __init__(self, job: _Optional[str] = ..., skeleton_json: _Optional[str] = ..., tensor: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., step: _Optional[int] = ...) -> None: ...

class LoadStateReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("service_id",)
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    def __init__(self, service_id: _Optional[str] = ...) -> None: ...

class ServiceInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceInfo(_message.Message):
    __slots__ = ("service_id", "shard_addresses")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    shard_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, service_id: _Optional[str] = ..., shard_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class DeleteJobReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("job", "step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...
