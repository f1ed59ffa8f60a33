"""Tensor-parallel ranks 1..N-1 of a cluster worker, as Ray actors.

A worker with TP N is one STRICT_PACK placement group of N bundles: rank 0 is the WorkerActor in bundle 0 (the
engine, gRPC and KV transport), rank i a TPRankActor in bundle i. They meet at the address rank 0 picks
(`WorkerActor.rendezvous`, handed to both as the same ObjectRef), form one torch.distributed group (gloo on CPU,
NCCL on GPU) and the ranks run the engine's rank loop (`workers.executor.run_rank`), driven by rank 0's
broadcasts, as the offline engine's spawned ranks do.

Liveness: `run` returns only when rank 0 shuts the group down. Its ObjectRef failing or resolving while the worker
should be serving means the rank is gone (killed, or its group failed): the controller then destroys the whole
worker, every rank and the placement group, and starts a new one; the routers move its requests as for any dead
worker. A rank whose rank 0 died leaves through the collective timeout (workers/parallel.py), if not killed first.
"""
from __future__ import annotations

import logging
import socket

import torch

from workers.config import EngineConfig
from workers.executor import run_rank
from workers.model.loader import load_model_config, resolve_model


class TPRankActor:
    """Rank `rank` (>= 1) of a worker's TP group of `size`, over the worker's engine options."""

    def __init__(self, engine: dict, rank: int, size: int, torch_threads: int | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = EngineConfig.from_kwargs(**{**engine, "tensor_parallel_size": size})
        self.rank = rank
        self.size = size
        self.torch_threads = torch_threads

    def run(self, init_method: str) -> int:
        """Join the group at `init_method` and serve rank 0 until it shuts the group down; returns this rank."""
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        source = resolve_model(self.config.model, self.config.load_format)
        model_config = load_model_config(source)
        # As LLMEngine gives its runner: the requested length, else the model's.
        max_model_len = self.config.max_model_len or model_config.max_position_embeddings
        run_rank(self.config, model_config, source, max_model_len, self.rank, self.size, init_method)
        return self.rank


def rendezvous_address(host: str) -> str:
    """A tcp:// address on `host` with a port free right now, for rank 0 to host the group's store on."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"
