"""Prometheus metrics of the service, and the logs that go with them.

Each process that hosts a server (the coordinator, every shard) records into the default registry of
``prometheus_client``; ``start_metrics_server(port)`` exposes it over HTTP for Prometheus to scrape.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from paramserver.core.coordinator import StepResult
from paramserver.core.membership import MembershipChange

log = logging.getLogger("paramserver")

STEPS = Counter("paramserver_steps", "Closed steps", ["job"])
SKIPPED = Counter("paramserver_skipped_steps", "Steps skipped for a non-finite gradient norm", ["job"])
STAGE_SECONDS = Histogram(
    "paramserver_stage_seconds", "Wall time of a step's stages", ["job", "stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CHECKPOINT_COPY_SECONDS = Histogram(
    "paramserver_checkpoint_copy_seconds", "How long a checkpoint's copy held its job at the step boundary", ["job"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
STANDBY_REBUILD_SECONDS = Histogram(
    "paramserver_standby_rebuild_seconds", "How long a standby's rebuild from its primary (the state copied over) held its job",
    ["job", "shard"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
GRAD_NORM = Gauge("paramserver_grad_norm", "Total gradient norm of the last step", ["job"])
LR = Gauge("paramserver_lr", "Learning rate of each param group for the next step", ["job", "group"])
BYTES_IN = Counter("paramserver_bytes_in", "Payload bytes received by a shard (gradients, initial weights)", ["job", "shard"])
MEMBERS = Gauge("paramserver_members", "Live members of a job", ["job"])
MEMBERSHIP_CHANGES = Counter("paramserver_membership_changes", "Membership changes, by reason", ["job", "reason"])
CONTRIBUTORS = Gauge("paramserver_contributors", "Workers whose gradients the last step used", ["job"])
BYTES_OUT = Counter("paramserver_bytes_out", "Payload bytes sent by a shard (weights)", ["job", "shard"])
SHARED_MEMORY_WORKERS = Gauge("paramserver_shared_memory_workers", "Workers attached to a shard through shared memory", ["job", "shard"])
SHARED_MEMORY_BYTES = Counter(
    "paramserver_shared_memory_bytes", "Payload bytes a shard read (in) or handed (out) through shared memory", ["job", "shard", "direction"]
)
WORKER_TRANSPORT = Gauge("paramserver_worker_transport", "1 for the transport each worker's lease renewal named", ["job", "worker", "transport"])


def record_step(job: str, result: StepResult) -> None:
    STEPS.labels(job).inc()
    if result.skipped:
        SKIPPED.labels(job).inc()
    for stage, seconds in result.seconds.items():
        STAGE_SECONDS.labels(job, stage).observe(seconds)
    GRAD_NORM.labels(job).set(result.total_norm)
    CONTRIBUTORS.labels(job).set(len(result.contributors))
    for group, lr in enumerate(result.lrs):
        LR.labels(job, str(group)).set(lr)
    log.debug("job %s step %d closed: total norm %.4g, clip %s, skipped %s, lrs %s, %s",
              job, result.step, result.total_norm, result.clip_coef, result.skipped, result.lrs,
              {k: round(v * 1e3, 2) for k, v in result.seconds.items()})
    if result.skipped:
        log.warning("job %s step %d skipped: total norm %s%s", job, result.step, result.total_norm,
                    f" ({result.error})" if result.error else "")


def record_checkpoint_copy(job: str, seconds: float) -> None:
    CHECKPOINT_COPY_SECONDS.labels(job).observe(seconds)


def record_standby_rebuild(job: str, shard: int, seconds: float) -> None:
    STANDBY_REBUILD_SECONDS.labels(job, str(shard)).observe(seconds)


def record_membership(job: str, change: MembershipChange, members: int) -> None:
    MEMBERSHIP_CHANGES.labels(job, change.reason).inc()
    MEMBERS.labels(job).set(members)
    log.info("job %s: worker %d %s at step %d (%d members)", job, change.rank, change.reason, change.step, members)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Expose this process's metrics over HTTP; returns the port (pass 0 for any free one)."""
    server, _ = start_http_server(port, addr=host)
    return server.server_port
