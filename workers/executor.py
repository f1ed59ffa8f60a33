"""Executors run the ModelRunner on every tensor-parallel rank and hide how ranks are reached.

The driver's engine calls the executor; with TP > 1, ranks 1..N-1 are processes started here that loop on
commands broadcast by rank 0 over the process group (gloo on CPU, NCCL on GPU).
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

    def export_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """One tensor per TP rank, in rank order."""
        return [self.runner.export_blocks(block_ids)]

    def import_blocks(self, block_ids: list[int], per_rank: list[torch.Tensor]) -> None:
        self.runner.import_blocks(block_ids, per_rank[0])

    def shutdown(self) -> None:
        pass


class MultiprocTPExecutor(Executor):
    """TP > 1 on one machine: rank 0 in this process, the other ranks in spawned processes."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, source: ModelSource, max_model_len: int):
        size = config.tensor_parallel_size
        self.tp_size = size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=_worker_main, args=(config, model_config, source, max_model_len, rank, size, init_method),
                        daemon=True, name=f"tandem-tp{rank}")
            for rank in range(1, size)
        ]
        for p in self.procs:
            p.start()
        self.tp = init_tp_group(0, size, init_method, resolve_device(config.device))
        self.runner = build_runner(config, model_config, source, self.tp, max_model_len)

    def execute(self, inp: ModelInput) -> torch.Tensor | None:
        self.tp.broadcast_object(("execute", inp))
        return self.runner.execute(inp)

    def export_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        self.tp.broadcast_object(("export", block_ids))
        return self.tp.gather_objects(self.runner.export_blocks(block_ids))

    def import_blocks(self, block_ids: list[int], per_rank: list[torch.Tensor]) -> None:
        self.tp.broadcast_object(("import", block_ids))
        self.runner.import_blocks(block_ids, self.tp.scatter_objects(per_rank))

    def shutdown(self) -> None:
        if not self.procs:
            return
        self.tp.broadcast_object(("shutdown",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.procs = []
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(config, model_config, source, max_model_len, rank, size, init_method) -> None:
    """Rank > 0: build this rank's shard, then run whatever rank 0 broadcasts until told to stop."""
    _exit_with_parent()
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    tp = init_tp_group(rank, size, init_method, resolve_device(config.device))
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
    dist.destroy_process_group()


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A rank blocked in a collective would wait for a dead driver forever: leave as soon as it is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="tandem-parent-watch", daemon=True).start()
