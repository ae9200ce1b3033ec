"""The baselines the service is compared against in one benchmark run.

Transport ceilings (what moving bytes over loopback costs without the service):

- :func:`raw_socket_gbps`: a plain TCP socket, ``recv_into`` a preallocated buffer;
- :func:`raw_grpc_gbps`: Python gRPC streaming raw bytes (identity serializers), push or pull: the ceiling
  for the service's push/pull, which also runs over Python gRPC.

Training peers (the same model, data, optimizer and clipping as the service's end-to-end benchmark):

- :func:`local_steps_per_s`: one process, no communication: the compute ceiling;
- :func:`ddp_gloo_steps_per_s`: torch DDP over gloo (all-reduce, no server);
- :func:`ray_ps_steps_per_s`: the parameter-server pattern of Ray's documentation (weights and gradients
  through Ray's object store, the optimizer in a PS actor).

Everything binds and talks on 127.0.0.1 only, and every wait has a deadline. Run ``python -m
benchmarks.peers`` from the repository root for a quick demo with small sizes.
"""

from __future__ import annotations

import datetime
import math
import os
import queue as queue_mod
import socket
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.common import batch, make_mlp

GB = 1e9
LOOPBACK = "127.0.0.1"
MAX_NORM = 1.0
LR = 1e-3
WARMUP_STEPS = 2
_REPO_ROOT = str(Path(__file__).resolve().parents[1])

_GRPC_PUSH = "/paramserver.bench.RawBytes/Push"
_GRPC_PULL = "/paramserver.bench.RawBytes/Pull"


def _check_sizes(nbytes: int, chunk_bytes: int, repeats: int) -> None:
    if nbytes <= 0 or chunk_bytes <= 0 or repeats <= 0:
        raise ValueError(f"nbytes, chunk_bytes and repeats must be > 0, got {nbytes}, {chunk_bytes}, {repeats}")


def _threads_per_worker(num_workers: int) -> int:
    """The torch intra-op threads each of ``num_workers`` co-located peers gets (they share the cores)."""
    return max(1, (os.cpu_count() or 1) // num_workers)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int, batch_size: int) -> None:
    """One local step: forward + backward on ``batch(step, rank)``, clip_grad_norm_ 1.0, optimizer step."""
    x, y = batch(step, rank, batch_size)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()


# --------------------------------------------------------------------------------------------------------------
# 1. Plain TCP socket
# --------------------------------------------------------------------------------------------------------------


def raw_socket_gbps(nbytes: int, chunk_bytes: int, repeats: int, *, timeout_s: float = 60.0) -> float:
    """GB/s (1e9 bytes/s) of sending ``nbytes`` over one TCP connection on 127.0.0.1: the BEST of ``repeats``.

    The client ``sendall``s slices of a memoryview of a preallocated buffer, ``chunk_bytes`` per call; a server
    thread ``recv_into``s a preallocated bytearray (at most ``chunk_bytes`` per call) and answers one byte when
    all ``nbytes`` are in. A transfer is timed from its first send to that acknowledgement. One untimed
    transfer warms the connection up first. No serialization, no copies in Python: the loopback ceiling.
    """
    _check_sizes(nbytes, chunk_bytes, repeats)
    src = memoryview(bytearray(os.urandom(min(nbytes, 1 << 20))) * math.ceil(nbytes / (1 << 20)))[:nbytes]
    dst = bytearray(nbytes)
    rounds = repeats + 1
    errors: list[BaseException] = []

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(timeout_s)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout_s)
                view = memoryview(dst)
                for _ in range(rounds):
                    got = 0
                    while got < nbytes:
                        n = conn.recv_into(view[got:], min(chunk_bytes, nbytes - got))
                        if n == 0:
                            raise ConnectionError("client closed the connection mid-transfer")
                        got += n
                    conn.sendall(b"\x01")
        except BaseException as exc:  # reported by the client side
            errors.append(exc)

    server = threading.Thread(target=serve, name="raw-socket-server", daemon=True)
    server.start()
    best = 0.0
    try:
        with socket.create_connection((LOOPBACK, listener.getsockname()[1]), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for r in range(rounds):
                start = time.perf_counter()
                for off in range(0, nbytes, chunk_bytes):
                    sock.sendall(src[off : off + chunk_bytes])
                if sock.recv(1) != b"\x01":
                    raise ConnectionError("no acknowledgement from the server")
                elapsed = time.perf_counter() - start
                if r > 0:
                    best = max(best, nbytes / elapsed / GB)
    finally:
        server.join(timeout_s)
        listener.close()
    if errors:
        raise RuntimeError(f"raw socket server failed: {errors[0]!r}") from errors[0]
    if dst[:16] != src[:16].tobytes() or dst[-16:] != src[-16:].tobytes():
        raise RuntimeError("raw socket transfer corrupted the data")
    return best


# --------------------------------------------------------------------------------------------------------------
# 2. Raw gRPC streaming
# --------------------------------------------------------------------------------------------------------------


def raw_grpc_gbps(nbytes: int, chunk_bytes: int, repeats: int, direction: str, *, timeout_s: float = 60.0) -> float:
    """GB/s (1e9 bytes/s) of streaming ``nbytes`` through Python gRPC on 127.0.0.1: the BEST of ``repeats``.

    ``direction="push"``: a client-streaming call; the client sends ``chunk_bytes`` messages and the server
    copies each into a preallocated buffer, then answers. ``"pull"``: a server-streaming call; the server sends
    the chunks and the client copies each into a preallocated buffer. Generic handlers with identity
    serializers (messages are raw ``bytes``, no protobuf), message limits raised above ``chunk_bytes`` on both
    sides. A sender must hand gRPC ``bytes``, so every chunk is one ``bytes(view[a:b])`` copy of one
    preallocated buffer, as the service's senders also must do. One untimed call warms up first. This is the
    ceiling for the service's push/pull over Python gRPC.
    """
    import grpc

    _check_sizes(nbytes, chunk_bytes, repeats)
    if direction not in ("push", "pull"):
        raise ValueError(f"direction must be 'push' or 'pull', got {direction!r}")
    limit = chunk_bytes + (1 << 20)
    options = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]
    payload = bytearray(os.urandom(min(nbytes, 1 << 20))) * math.ceil(nbytes / (1 << 20))
    src = memoryview(payload)[:nbytes]  # the sender's buffer (client for push, server for pull)
    dst = bytearray(nbytes)  # the receiver's buffer (server for push, client for pull)

    def push(request_iterator: Any, context: grpc.ServicerContext) -> bytes:
        off = 0
        for chunk in request_iterator:
            end = off + len(chunk)
            if end > nbytes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more bytes than announced")
            dst[off:end] = chunk
            off = end
        return off.to_bytes(8, "little")

    def pull(request: bytes, context: grpc.ServicerContext) -> Any:
        total = int.from_bytes(request, "little")
        for off in range(0, total, chunk_bytes):
            yield bytes(src[off : off + chunk_bytes])  # the copy a Python gRPC sender must make

    handler = grpc.method_handlers_generic_handler(
        "paramserver.bench.RawBytes",
        {
            "Push": grpc.stream_unary_rpc_method_handler(push, request_deserializer=None, response_serializer=None),
            "Pull": grpc.unary_stream_rpc_method_handler(pull, request_deserializer=None, response_serializer=None),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    if port == 0:
        raise RuntimeError("could not bind a gRPC server on 127.0.0.1")
    server.start()
    channel = grpc.insecure_channel(f"{LOOPBACK}:{port}", options=[*options, ("grpc.enable_http_proxy", 0)])
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        push_call = channel.stream_unary(_GRPC_PUSH, request_serializer=None, response_deserializer=None)
        pull_call = channel.unary_stream(_GRPC_PULL, request_serializer=None, response_deserializer=None)

        def chunks() -> Any:
            for off in range(0, nbytes, chunk_bytes):
                yield bytes(src[off : off + chunk_bytes])  # the copy a Python gRPC sender must make

        def once() -> None:
            if direction == "push":
                got = int.from_bytes(push_call(chunks(), timeout=timeout_s), "little")
            else:
                got = 0
                for chunk in pull_call(nbytes.to_bytes(8, "little"), timeout=timeout_s):
                    dst[got : got + len(chunk)] = chunk
                    got += len(chunk)
            if got != nbytes:
                raise RuntimeError(f"gRPC {direction} moved {got} bytes, expected {nbytes}")

        once()
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            best = max(best, nbytes / (time.perf_counter() - start) / GB)
        if dst[:16] != src[:16].tobytes() or dst[-16:] != src[-16:].tobytes():
            raise RuntimeError(f"gRPC {direction} corrupted the data")
        return best
    finally:
        channel.close()
        server.stop(grace=None).wait(timeout_s)


# --------------------------------------------------------------------------------------------------------------
# 3. One local process
# --------------------------------------------------------------------------------------------------------------


def local_steps_per_s(steps: int, batch_size: int) -> float:
    """Training steps/s of one process, no communication: ``make_mlp()``, Adam(lr=1e-3), forward + backward on
    ``batch(step, 0, batch_size)``, ``clip_grad_norm_(…, 1.0)``, step; timed over ``steps`` steps after 2 warmup
    steps, with torch's default thread count (all cores).

    This is the compute ceiling: the 2-worker peers (DDP, Ray PS, the service) run two such computations on the
    same 2 cores, so each of their steps does twice this compute (on twice the samples) on the same hardware.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be > 0, got {steps}, {batch_size}")
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for s in range(WARMUP_STEPS):
        _train_step(model, opt, s, 0, batch_size)
    start = time.perf_counter()
    for s in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        _train_step(model, opt, s, 0, batch_size)
    return steps / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------------------
# 4. torch DDP over gloo
# --------------------------------------------------------------------------------------------------------------


def _loopback_ifname() -> str:
    for _, name in socket.if_nameindex():
        if name == "lo" or name.startswith("lo"):
            return name
    return "lo"


def _ddp_worker(rank: int, world: int, port: int, steps: int, batch_size: int, results: Any, timeout_s: float) -> None:
    """One DDP rank (a spawned process). Rank 0 puts ("ok", steps/s); any rank puts ("error", ...) on failure."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = LOOPBACK
    os.environ["MASTER_PORT"] = str(port)
    # gloo's own connections: the loopback interface, not whatever the hostname resolves to.
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_ifname()
    torch.set_num_threads(_threads_per_worker(world))
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if rank == 0:
            # TCPStore's own listener binds the wildcard address; hand it a socket bound to 127.0.0.1 instead.
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LOOPBACK, port))
            listener.listen(world)
            store = dist.TCPStore(LOOPBACK, port, world, True, timeout, master_listen_fd=listener.detach())
        else:
            store = dist.TCPStore(LOOPBACK, port, world, False, timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            model = DDP(make_mlp())
            opt = torch.optim.Adam(model.parameters(), lr=LR)
            for s in range(WARMUP_STEPS):
                _train_step(model, opt, s, rank, batch_size)
            dist.barrier()
            start = time.perf_counter()
            for s in range(WARMUP_STEPS, WARMUP_STEPS + steps):
                _train_step(model, opt, s, rank, batch_size)
            elapsed = time.perf_counter() - start
            if rank == 0:
                results.put(("ok", steps / elapsed))
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        results.put(("error", rank, repr(exc)))
        raise


def ddp_gloo_steps_per_s(num_workers: int, steps: int, batch_size: int, *, timeout_s: float = 180.0) -> float:
    """Training steps/s of torch DDP with ``num_workers`` gloo processes on 127.0.0.1, measured by rank 0.

    Each rank (spawned with torch.multiprocessing, ``torch.set_num_threads(cpu_count // num_workers)``) trains
    ``make_mlp()`` on ``batch(step, rank, batch_size)`` with Adam(lr=1e-3) and ``clip_grad_norm_`` 1.0; DDP
    all-reduces (averages) the gradients during backward. Rank 0 times ``steps`` steps after 2 warmup steps and a
    barrier. A step here processes ``num_workers * batch_size`` samples. Everything is bounded by ``timeout_s``;
    ranks still alive after it are killed.
    """
    if num_workers <= 0 or steps <= 0 or batch_size <= 0:
        raise ValueError(f"num_workers, steps and batch_size must be > 0, got {num_workers}, {steps}, {batch_size}")
    import torch.multiprocessing as tmp

    from paramserver.service.ports import free_port_base  # here: the ranks import this module, and need none of it

    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    port = free_port_base(LOOPBACK)  # below the ephemeral range: no outgoing connection takes it before rank 0 binds it
    procs = [
        ctx.Process(target=_ddp_worker, args=(rank, num_workers, port, steps, batch_size, results, timeout_s), daemon=True, name=f"ddp-rank{rank}")
        for rank in range(num_workers)
    ]
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.start()
    try:
        while True:
            try:
                message = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"DDP did not report within {timeout_s:.0f} s") from None
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"DDP rank {dead[0].name} exited with code {dead[0].exitcode}") from None
                continue
            if message[0] == "ok":
                result = float(message[1])
                break
            raise RuntimeError(f"DDP rank {message[1]} failed: {message[2]}")
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        return result
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        results.close()
        results.join_thread()


# --------------------------------------------------------------------------------------------------------------
# 5. Ray parameter server (the pattern of Ray's documentation)
# --------------------------------------------------------------------------------------------------------------


class _RayParameterServer:
    """The PS actor of Ray's parameter-server example: the model and the optimizer live here."""

    def __init__(self, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.model = make_mlp()
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=LR)

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.model.state_dict().items()}

    def apply_gradients(self, *gradients: list[Any]) -> dict[str, torch.Tensor]:
        """Averages the workers' gradients, clips by the global norm 1.0, one Adam step; the new weights."""
        import numpy as np

        count = len(gradients)
        for p, grads in zip(self.params, zip(*gradients)):
            mean = np.array(grads[0], copy=True)  # the object store's arrays are read-only
            for g in grads[1:]:
                mean += g
            mean /= count
            p.grad = torch.from_numpy(mean)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM)
        self.optimizer.step()
        return self.get_weights()


class _RayDataWorker:
    """The worker actor of Ray's parameter-server example: loads the weights it is given, returns gradients."""

    def __init__(self, rank: int, batch_size: int, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.rank = rank
        self.batch_size = batch_size
        self.model = make_mlp()

    def compute_gradients(self, weights: dict[str, torch.Tensor], step: int) -> list[Any]:
        self.model.load_state_dict(weights)
        self.model.zero_grad(set_to_none=True)
        x, y = batch(step, self.rank, self.batch_size)
        F.cross_entropy(self.model(x), y).backward()
        return [p.grad.numpy() for p in self.model.parameters()]


def ray_ps_steps_per_s(num_workers: int, steps: int, batch_size: int, *, timeout_s: float = 180.0) -> float:
    """Synchronous training steps/s of the parameter-server pattern of Ray's documentation.

    A PS actor holds ``make_mlp()`` and Adam(lr=1e-3); ``num_workers`` worker actors each get the current weights
    (a state dict of tensors) through the object store, compute gradients on ``batch(step, rank, batch_size)``
    and return them (numpy arrays) through the object store; the PS averages the W gradients, clips them by the
    global norm 1.0, steps Adam and returns the next weights as an object ref that the next step's workers take.
    Timed over ``steps`` steps after 2 warmup steps (which also absorb the actors' start). Actors get fractional
    ``num_cpus`` so W workers + the PS fit on this machine's CPUs, and ``torch.set_num_threads(cpu_count // W)``
    as in DDP. Starts its own local Ray on 127.0.0.1 (and shuts it down) only if
    ``ray.is_initialized()`` is False; otherwise it uses the caller's Ray.
    """
    if num_workers <= 0 or steps <= 0 or batch_size <= 0:
        raise ValueError(f"num_workers, steps and batch_size must be > 0, got {num_workers}, {steps}, {batch_size}")
    import ray

    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Ray PS did not finish within {timeout_s:.0f} s")
        return remaining

    started_ray = False
    if not ray.is_initialized():
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on 127.0.0.1
        # address="local": a fresh instance of our own. With address=None, ray.init() attaches to the last Ray
        # started on this machine (/tmp/ray/ray_current_cluster) or to RAY_ADDRESS, e.g. a concurrent test's.
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        started_ray = True
    actors: list[Any] = []
    try:
        cpus = float(ray.available_resources().get("CPU", os.cpu_count() or 1))
        share = math.floor(cpus / (num_workers + 1) * 1e4) / 1e4  # Ray's resource granularity is 1e-4
        if share <= 0:
            raise RuntimeError(f"not enough free CPUs in Ray for {num_workers} workers + the PS: {cpus}")
        threads = _threads_per_worker(num_workers)
        # The actors import this module: make sure the repository root is on their path.
        pythonpath = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
        ps_cls = ray.remote(_RayParameterServer).options(num_cpus=share, runtime_env=runtime_env)
        worker_cls = ray.remote(_RayDataWorker).options(num_cpus=share, runtime_env=runtime_env)
        ps = ps_cls.remote(threads)
        actors.append(ps)
        workers = [worker_cls.remote(rank, batch_size, threads) for rank in range(num_workers)]
        actors.extend(workers)

        weights = ps.get_weights.remote()

        def step(s: int) -> None:
            nonlocal weights
            grads = [w.compute_gradients.remote(weights, s) for w in workers]
            weights = ps.apply_gradients.remote(*grads)

        def wait_done() -> None:
            ready, _ = ray.wait([weights], timeout=left(), fetch_local=False)
            if not ready:
                raise TimeoutError(f"Ray PS did not finish within {timeout_s:.0f} s")

        for s in range(WARMUP_STEPS):
            step(s)
        ray.get(weights, timeout=left())  # also surfaces a failed start
        start = time.perf_counter()
        for s in range(WARMUP_STEPS, WARMUP_STEPS + steps):
            step(s)
        wait_done()
        elapsed = time.perf_counter() - start
        ray.get(weights, timeout=left())  # an error in the timed steps is raised here, outside the timing
        return steps / elapsed
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()


# --------------------------------------------------------------------------------------------------------------


def _demo(nbytes: int = 16 << 20, chunk_bytes: int = 2 << 20, repeats: int = 3, steps: int = 5, batch_size: int = 32, workers: int = 2) -> None:
    """Prints every figure with small sizes."""
    mib = nbytes / 2**20
    t0 = time.perf_counter()
    print(f"raw socket       {mib:.0f} MiB / {chunk_bytes >> 20} MiB chunks: {raw_socket_gbps(nbytes, chunk_bytes, repeats):7.2f} GB/s (best of {repeats})", flush=True)
    for direction in ("push", "pull"):
        gbps = raw_grpc_gbps(nbytes, chunk_bytes, repeats, direction)
        print(f"raw gRPC {direction}    {mib:.0f} MiB / {chunk_bytes >> 20} MiB chunks: {gbps:7.2f} GB/s (best of {repeats})", flush=True)
    print(f"local            {steps} steps, batch {batch_size}: {local_steps_per_s(steps, batch_size):7.2f} steps/s", flush=True)
    print(f"DDP gloo x{workers}      {steps} steps, batch {batch_size}: {ddp_gloo_steps_per_s(workers, steps, batch_size):7.2f} steps/s", flush=True)
    print(f"Ray PS x{workers}        {steps} steps, batch {batch_size}: {ray_ps_steps_per_s(workers, steps, batch_size):7.2f} steps/s", flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    import argparse

    from benchmarks import (
        peers,  # the functions by their importable name, for the spawned DDP ranks
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16, help="buffer size for the transport figures")
    parser.add_argument("--chunk-mib", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    peers._demo(args.mib << 20, args.chunk_mib << 20, args.repeats, args.steps, args.batch_size, args.workers)
