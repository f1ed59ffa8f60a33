"""Executors run the ModelRunner on every tensor-parallel rank and hide how ranks are reached.

The driver's engine calls the executor; with TP > 1, ranks 1..N-1 loop on commands broadcast by rank 0 over the
process group (gloo on CPU, NCCL on GPU): processes spawned here (MultiprocTPExecutor, offline), or started by
someone else that run `run_rank` and meet rank 0 at a given address (TPDriverExecutor; the cluster's Ray actors,
cluster/tp_ranks.py).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time

import torch
import torch.distributed as dist

from workers.config import EngineConfig
from workers.model.config import ModelConfig
from workers.model.loader import ModelSource
from workers.model_runner import ModelInput, ModelRunner, resolve_device
from workers.parallel import TPGroup, init_tp_group

log = logging.getLogger(__name__)


def _agree_num_blocks(runner: ModelRunner, tp: TPGroup) -> int:
    n = torch.tensor([runner.available_kv_blocks()], dtype=torch.long)
    if tp.size > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=tp.group)
    return int(n.item())


def build_runner(config, model_config, source, tp, max_model_len) -> ModelRunner:
    runner = ModelRunner(config, model_config, source, tp, max_model_len)
    runner.allocate_kv_cache(_agree_num_blocks(runner, tp))
    runner.capture_cuda_graphs()
    return runner


class Executor:
    """Single process (TP = 1): calls the runner directly."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, source: ModelSource, max_model_len: int):
        self.runner = build_runner(config, model_config, source, TPGroup(), max_model_len)
        self.tp_size = 1

    def execute(self, inp: ModelInput) -> torch.Tensor | None:
        return self.runner.execute(inp)

    def export_blocks(self, block_ids: list[int], on_device: bool = False) -> list[torch.Tensor]:
        """One tensor per TP rank, in rank order; on the engine's device with `on_device` (a TP group gathers its
        shards in host memory whatever it is asked)."""
        return [self.runner.export_blocks(block_ids, on_device)]

    def import_blocks(self, block_ids: list[int], per_rank: list[torch.Tensor]) -> None:
        self.runner.import_blocks(block_ids, per_rank[0])

    def shutdown(self) -> None:
        pass


class TPDriverExecutor(Executor):
    """TP > 1, rank 0 in this process: every call is broadcast to ranks 1..N-1, which run `run_rank` wherever
    they were started (spawned processes, or the cluster's Ray actors) and meet rank 0 at `init_method`.

    All collectives go through one lock: the engine thread's calls and the keep-alive thread's, which sends a
    no-op when nothing was sent for `keepalive_s`, so an idle group never hits the collective timeout and a dead
    rank shows up as an error here (`error`, raised by the next call) even while no request runs."""

    keepalive_s = 30.0

    def __init__(self, config: EngineConfig, model_config: ModelConfig, source: ModelSource, max_model_len: int,
                 init_method: str):
        self.tp_size = config.tensor_parallel_size
        self.tp = init_tp_group(0, self.tp_size, init_method, resolve_device(config.device))
        self.runner = build_runner(config, model_config, source, self.tp, max_model_len)
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._keepalive = threading.Thread(target=self._keep_alive, name="tandem-tp-keepalive", daemon=True)
        self._keepalive.start()

    def _send(self, cmd: tuple) -> None:
        if self.error is not None:
            raise RuntimeError(f"tensor-parallel group failed: {self.error}") from self.error
        self.tp.broadcast_object(cmd)
        self._last_sent = time.monotonic()

    def execute(self, inp: ModelInput) -> torch.Tensor | None:
        with self._lock:
            self._send(("execute", inp))
            return self.runner.execute(inp)

    def export_blocks(self, block_ids: list[int], on_device: bool = False) -> list[torch.Tensor]:
        # Host memory always: each rank's device is its own (every Ray actor sees its GPU as cuda:0).
        with self._lock:
            self._send(("export", block_ids))
            return self.tp.gather_objects(self.runner.export_blocks(block_ids))

    def import_blocks(self, block_ids: list[int], per_rank: list[torch.Tensor]) -> None:
        with self._lock:
            self._send(("import", block_ids))
            self.runner.import_blocks(block_ids, self.tp.scatter_objects(per_rank))

    def _keep_alive(self) -> None:
        device = self.runner.device
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's object collectives use the thread's current device
        while not self._closed.wait(self.keepalive_s / 4):
            with self._lock:
                if self._closed.is_set() or self.error is not None:
                    return
                if time.monotonic() - self._last_sent < self.keepalive_s:
                    continue
                try:
                    self._send(("noop",))
                except Exception as e:  # noqa: BLE001 - a rank is gone: the engine's next call raises it
                    log.error("tensor-parallel group failed: %s", e)
                    self.error = e
                    return

    def shutdown(self) -> None:
        if self._closed.is_set():
            return
        with self._lock:
            self._closed.set()
            if self.error is None:
                try:
                    self.tp.broadcast_object(("shutdown",))
                except Exception:  # noqa: BLE001 - a rank is gone already; the group goes anyway
                    pass
        self._stop_ranks()
        dist.destroy_process_group()

    def _stop_ranks(self) -> None:
        pass


class MultiprocTPExecutor(TPDriverExecutor):
    """TP > 1 on one machine: rank 0 in this process, the other ranks in spawned processes."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, source: ModelSource, max_model_len: int):
        size = config.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=_worker_main, args=(config, model_config, source, max_model_len, rank, size, init_method),
                        daemon=True, name=f"tandem-tp{rank}")
            for rank in range(1, size)
        ]
        for p in self.procs:
            p.start()
        super().__init__(config, model_config, source, max_model_len, init_method)

    def _stop_ranks(self) -> None:
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.procs = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(config, model_config, source, max_model_len, rank, size, init_method) -> None:
    _exit_with_parent()
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    run_rank(config, model_config, source, max_model_len, rank, size, init_method)


def run_rank(config: EngineConfig, model_config: ModelConfig, source: ModelSource, max_model_len: int, rank: int,
             size: int, init_method: str) -> None:
    """Rank > 0: join the group at `init_method`, build this rank's shard, then run whatever rank 0 broadcasts
    until told to stop. Raises when the group fails (a rank gone, or nothing heard for the collective timeout)."""
    tp = init_tp_group(rank, size, init_method, resolve_device(config.device))
    try:
        runner = build_runner(config, model_config, source, tp, max_model_len)
        while True:
            cmd = tp.broadcast_object()
            op = cmd[0]
            if op == "execute":
                runner.execute(cmd[1])
            elif op == "export":
                tp.gather_objects(runner.export_blocks(cmd[1]))
            elif op == "import":
                runner.import_blocks(cmd[1], tp.scatter_objects(None))
            elif op == "shutdown":
                break
    finally:
        dist.destroy_process_group()


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A rank blocked in a collective would wait for a dead driver forever: leave as soon as it is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="tandem-parent-watch", daemon=True).start()
