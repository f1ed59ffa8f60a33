"""Tensor-parallel process group: one rank per device, NCCL on CUDA and gloo on CPU.

The group is passed explicitly to every layer that needs it (no global state). With tp_size == 1 there is
no group at all and the collectives below are no-ops, so single-process runs never touch torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's shard along the last dimension, on every rank."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj=None):
        """Send a picklable object from rank 0 to all ranks; returns it on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_objects(self, obj) -> list | None:
        """Collect one object from each rank on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def scatter_objects(self, objs: list | None):
        """Rank 0 hands objs[i] to rank i; returns this rank's object."""
        if self.size == 1:
            return objs[0]
        box = [None]
        dist.scatter_object_list(box, objs if self.rank == 0 else None, src=0, group=self.group)
        return box[0]


# How long joining the group, and any one collective, may wait for the other ranks. Rank 0 sends a keep-alive
# command when idle (workers/executor.py), so only a dead or stuck peer makes a collective wait this long.
TP_TIMEOUT_S = 300.0


def init_tp_group(rank: int, size: int, init_method: str, device: torch.device,
                  timeout_s: float = TP_TIMEOUT_S) -> TPGroup:
    """Join the world of `size` ranks; the TP group is the whole world (one engine per world). Joining and every
    collective raise after `timeout_s` instead of waiting forever for a rank that is gone."""
    if size == 1:
        return TPGroup()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    return TPGroup(rank=rank, size=size, group=dist.group.WORLD)


def check_tp_size(size: int, num_attention_heads: int, num_key_value_heads: int, what: str = "tensor_parallel_size") -> None:
    """ValueError naming `what` and the sizes allowed unless `size` divides both head counts (each rank holds an
    equal share of the query and the KV heads)."""
    if num_attention_heads % size or num_key_value_heads % size:
        allowed = [n for n in range(1, num_key_value_heads + 1)
                   if num_attention_heads % n == 0 and num_key_value_heads % n == 0]
        raise ValueError(f"{what}: must divide the model's num_attention_heads={num_attention_heads} and "
                         f"num_key_value_heads={num_key_value_heads} (allowed: {', '.join(map(str, allowed))}), "
                         f"got {size}")


def shard_range(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """[start, end) of rank's equal shard of `total`; a clear error when it does not divide."""
    if total % size:
        raise ValueError(f"tensor_parallel_size: {size} must divide {what}={total}")
    n = total // size
    return rank * n, (rank + 1) * n
