"""KV between TP sizes: a prefill group's per-rank shards regrouped for a decode group of another size.

Rank r of a TP group of size n holds KV heads [r * H / n, (r + 1) * H / n) of the model's H (workers.parallel's
shard_range), so going from n to m ranks only regroups dimension 4 of the KV tensors.
"""
from __future__ import annotations

import torch

from workers.kv.handoff import KVPayload

_HEADS_DIM = 4
# Fields every shard of one request's hand-off must agree on (the kv shape is checked apart).
_SHARED_FIELDS = ("request_id", "model", "layout", "block_size", "dtype", "tp_size", "num_kv_heads_total",
                  "prompt_token_ids", "output_token_ids", "num_computed_tokens", "num_cached_tokens")


def reshard_kv(shards: list[torch.Tensor], to_size: int) -> list[torch.Tensor]:
    """Regroup the KV heads of `shards` (one per source rank, in rank order) into `to_size` shards.

    shards: len(shards) x [num_layers, 2, num_blocks, block_size, H / len(shards), head_dim]
    returns: to_size x [num_layers, 2, num_blocks, block_size, H / to_size, head_dim]

    With equal sizes the input list itself comes back (no copy). Otherwise each output is one copy, contiguous
    (the transports and index_copy_ want that): a cat of whole source shards when merging, a copied slice of one
    when splitting, and a cat of slices for sizes that divide neither way (2 -> 3 ranks over 6 heads).
    ValueError naming `tp_size` or `num_kv_heads` when the heads do not divide or the shards disagree.
    """
    if not shards:
        raise ValueError("tp_size: no KV shards to reshard")
    if to_size < 1:
        raise ValueError(f"tp_size: must be >= 1, got {to_size}")
    first = shards[0]
    if first.dim() != 6:
        raise ValueError(f"kv: shard shape {tuple(first.shape)} is not "
                         "[layers, 2, blocks, block_size, kv_heads, head_dim]")
    for rank, shard in enumerate(shards[1:], start=1):
        if shard.shape != first.shape or shard.dtype != first.dtype or shard.device != first.device:
            raise ValueError(f"num_kv_heads: shard {rank} is {tuple(shard.shape)} {shard.dtype} on {shard.device}, "
                             f"shard 0 is {tuple(first.shape)} {first.dtype} on {first.device}; shards must match")
    from_size = len(shards)
    if to_size == from_size:
        return shards
    heads_in = first.shape[_HEADS_DIM]
    num_heads = heads_in * from_size
    if num_heads % to_size:
        raise ValueError(f"tp_size: {to_size} must divide num_kv_heads={num_heads}")
    heads_out = num_heads // to_size
    out = []
    for rank in range(to_size):
        start, end = rank * heads_out, (rank + 1) * heads_out
        pieces = []
        for src in range(start // heads_in, -(-end // heads_in)):  # the source ranks holding [start, end)
            base = src * heads_in
            lo, hi = max(start, base), min(end, base + heads_in)
            pieces.append(shards[src].narrow(_HEADS_DIM, lo - base, hi - lo))
        out.append(torch.cat(pieces, dim=_HEADS_DIM) if len(pieces) > 1 else pieces[0].contiguous())
    return out


def check_shard_set(payloads: list[KVPayload]) -> None:
    """Raise ValueError naming the field unless `payloads` is one request's complete hand-off: payloads[i] is rank i
    of `tp_size` ranks, each rank exactly once, all agreeing on the request, model, layout, dtype and blocks."""
    if not payloads:
        raise ValueError("tp_size: no KV payload shards")
    first = payloads[0]
    if len(payloads) != first.tp_size:
        raise ValueError(f"tp_size: got {len(payloads)} KV payload shards, the payloads say tp_size={first.tp_size}")
    for rank, p in enumerate(payloads):
        if p.tp_rank != rank:
            raise ValueError(f"tp_rank: shard {rank} has tp_rank={p.tp_rank}; shards must come in rank order, "
                             "each rank once")
        for name in _SHARED_FIELDS:
            if getattr(p, name) != getattr(first, name):
                raise ValueError(f"{name}: shard {rank} has {getattr(p, name)!r}, shard 0 has {getattr(first, name)!r}")
        if p.kv.shape != first.kv.shape or p.kv.dtype != first.kv.dtype:
            raise ValueError(f"kv: shard {rank} is {tuple(p.kv.shape)} {p.kv.dtype}, "
                             f"shard 0 is {tuple(first.kv.shape)} {first.kv.dtype}")
