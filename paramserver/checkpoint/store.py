"""The on-disk format: ``ROOT/JOB/step-000000123/`` holds ``coordinator.pt``, one ``shard-00000.pt`` per shard
(each a ``torch.save`` file; a shard in its own process writes its own) and ``manifest.json``, written last by
the coordinator (temp file, fsync, atomic rename, fsync of the directories), with the CRC-32 and size of every
other file. A checkpoint is valid iff its manifest exists and every file matches it; anything else is a write
that did not finish, ignored by readers and removed by a later write.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Collection
from typing import Any

import torch

from paramserver.checkpoint import io as fio

FORMAT = 2  # 1: files checked by sha256, 2: by CRC-32 (``io.write_from``); both are read
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
COORDINATOR = "coordinator.pt"
PREFIX = "step-"


def shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.pt"


def job_dir(root: str, job: str) -> str:
    # a job name is any string on the wire: quoted, it is one safe directory name
    return os.path.join(root, urllib.parse.quote(job, safe=""))


def step_dir(root: str, job: str, step: int) -> str:
    return os.path.join(job_dir(root, job), f"{PREFIX}{step:09d}")


def _step_of(name: str) -> int | None:
    if not name.startswith(PREFIX) or not name[len(PREFIX) :].isdigit():
        return None
    return int(name[len(PREFIX) :])


def _read_manifest(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") in READABLE_FORMATS else None


def steps(root: str, job: str) -> list[int]:
    """The steps of ``job`` whose checkpoint has a manifest (not yet checked against it), oldest first."""
    try:
        names = os.listdir(job_dir(root, job))
    except FileNotFoundError:
        return []
    found = [s for s in map(_step_of, names) if s is not None]
    return sorted(s for s in found if os.path.exists(os.path.join(step_dir(root, job, s), MANIFEST)))


def jobs(root: str) -> list[str]:
    """The jobs that have at least one checkpoint with a manifest under ``root``."""
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        job = urllib.parse.unquote(name)
        if os.path.isdir(os.path.join(root, name)) and steps(root, job):
            out.append(job)
    return out


def read(root: str, job: str, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The coordinator's part and every shard's part of a checkpoint; ``ValueError`` if it is not valid."""
    path = step_dir(root, job, step)
    manifest = _read_manifest(path)
    if manifest is None:
        raise ValueError(f"checkpoint {path} has no manifest: its write did not finish")
    loaded: dict[str, Any] = {}
    for name, meta in manifest["files"].items():
        file = os.path.join(path, name)
        try:
            intact = fio.file_matches(file, meta)
        except OSError as exc:
            raise ValueError(f"checkpoint {path}: {name} cannot be read ({exc})") from exc
        if not intact:
            raise ValueError(f"checkpoint {path}: {name} does not match its checksum")
        # weights_only: a checkpoint is data, never code. mmap: the tensors are the file's pages, mapped
        # copy-on-write (the file never changes), not a second copy of the file in memory.
        loaded[name] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    num_shards = manifest["num_shards"]
    return loaded[COORDINATOR], [loaded[shard_file(j)] for j in range(num_shards)]


def read_latest(root: str, job: str, step: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Checkpoint ``step``, or the newest valid one (an invalid newer one is skipped)."""
    if step is not None:
        return read(root, job, step)
    errors = []
    for s in reversed(steps(root, job)):
        try:
            return read(root, job, s)
        except ValueError as exc:
            errors.append(str(exc))
    raise FileNotFoundError(f"no valid checkpoint of job {job!r} under {root}" + (f" ({'; '.join(errors)})" if errors else ""))


def written(root: str, job: str, step: int) -> bool:
    """Whether checkpoint ``step`` of ``job`` has its manifest (its files are not checked)."""
    return _read_manifest(step_dir(root, job, step)) is not None


def write_file(path: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Write one file of a checkpoint (a shard's piece, or the coordinator's) to ``path``, its step directory made
    if need be, fsynced; returns its manifest entry (CRC-32 and size). Until a manifest lists it, it is a write
    that did not finish."""
    fio.makedirs(os.path.dirname(path))
    return fio.write_from(path, lambda f: torch.save(obj, f))


def begin(root: str, job: str, step: int, in_flight: Collection[int] = ()) -> bool:
    """Start writing checkpoint ``step``: remove what failed writes left (step directories without a manifest,
    but for the steps in ``in_flight``, whose shards may be writing now) and make its directory. False if it is
    already valid (nothing to write)."""
    _remove_unfinished(job_dir(root, job), {step, *in_flight})
    if written(root, job, step):
        return False
    fio.makedirs(step_dir(root, job, step))
    return True


def finish(root: str, job: str, step: int, coordinator: dict[str, Any], shard_files: list[dict[str, Any]], keep: int) -> str:
    """End the write of checkpoint ``step`` whose shard files are written (``shard_files``: shard j's manifest
    entry): the coordinator's file, then the manifest, which makes it valid; then keep only the newest ``keep``.
    Returns its directory."""
    jd, path = job_dir(root, job), step_dir(root, job, step)
    files = {COORDINATOR: write_file(os.path.join(path, COORDINATOR), coordinator)}
    files.update((shard_file(j), meta) for j, meta in enumerate(shard_files))
    manifest = {"format": FORMAT, "job": job, "step": step, "num_shards": len(shard_files), "files": files}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    fio.write(tmp, json.dumps(manifest, indent=1).encode())
    fio.rename(tmp, os.path.join(path, MANIFEST))  # from here on the checkpoint is valid
    fio.fsync_dir(path)
    fio.fsync_dir(jd)
    _prune(root, job, keep)
    return path


def write(root: str, job: str, step: int, coordinator: dict[str, Any], shards: list[dict[str, Any]], keep: int) -> str:
    """Write one whole checkpoint from this process (shard files, the coordinator's, manifest last), then keep
    only the newest ``keep``; returns its directory."""
    if not begin(root, job, step):
        return step_dir(root, job, step)  # already written (a periodic and an on-demand checkpoint of the same step)
    path = step_dir(root, job, step)
    files = [write_file(os.path.join(path, shard_file(j)), piece) for j, piece in enumerate(shards)]
    return finish(root, job, step, coordinator, files, keep)


def _remove_unfinished(jd: str, busy: Collection[int]) -> None:
    """Remove what a write that failed left (a step directory without a manifest), but for the ``busy`` steps:
    one writer per job runs at a time, and only those steps' shards may be writing."""
    try:
        names = os.listdir(jd)
    except FileNotFoundError:
        return
    for name in names:
        step = _step_of(name)
        if step is not None and step not in busy and _read_manifest(os.path.join(jd, name)) is None:
            fio.remove_tree(os.path.join(jd, name))


def _prune(root: str, job: str, keep: int) -> None:
    # only after the new one is valid: the newest ``keep`` stay
    for s in steps(root, job)[:-keep] if keep > 0 else []:
        fio.remove_tree(step_dir(root, job, s))
