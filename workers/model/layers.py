"""Building blocks of a Llama-family decoder, tensor-parallel aware.

Parallel layers hold only this rank's shard and load themselves from full (unsharded) checkpoint tensors,
so loaders never need to know about tensor parallelism.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.config import RopeScaling
from workers.parallel import TPGroup, shard_range


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows split across ranks.

    `part_sizes` lists the full output sizes of fused projections (q, k, v or gate, up); each part is
    sharded on its own so that every rank holds [q_shard; k_shard; v_shard] in one matrix.
    """

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool, tp: TPGroup, names: list[str]):
        super().__init__()
        self.tp = tp
        self.part_sizes = part_sizes
        self.part_names = names
        self.shard_sizes = [size // tp.size for size in part_sizes]
        for name, size in zip(names, part_sizes):
            shard_range(size, tp.rank, tp.size, f"{name} output size")
        out = sum(self.shard_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def load_part(self, name: str, kind: str, full: torch.Tensor) -> None:
        idx = self.part_names.index(name)
        start, end = shard_range(self.part_sizes[idx], self.tp.rank, self.tp.size, name)
        offset = sum(self.shard_sizes[:idx])
        target = self.weight if kind == "weight" else self.bias
        with torch.no_grad():
            target[offset : offset + end - start].copy_(full[start:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, name: str):
        super().__init__()
        self.tp = tp
        self.name = name
        self.in_features = in_features
        shard_range(in_features, tp.rank, tp.size, f"{name} input size")
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size))

    def load_full(self, full: torch.Tensor) -> None:
        start, end = shard_range(self.in_features, self.tp.rank, self.tp.size, self.name)
        with torch.no_grad():
            self.weight.copy_(full[:, start:end])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return math.ceil(vocab_size / tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks; a token outside this rank's range contributes zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_len = padded_vocab_size(vocab_size, tp.size) // tp.size
        self.vocab_start = tp.rank * self.shard_len
        self.weight = nn.Parameter(torch.zeros(self.shard_len, hidden_size))

    def load_full(self, full: torch.Tensor) -> None:
        rows = full[self.vocab_start : self.vocab_start + self.shard_len]
        with torch.no_grad():
            self.weight.zero_()
            self.weight[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_len)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection: each rank scores its vocab shard, then shards are gathered."""

    weight_t: torch.Tensor | None = None

    def keep_transposed_copy(self) -> None:
        """On CPU, x @ W^T streams a [hidden, vocab] copy about 1.8x faster than F.linear streams W at batch 1
        (the head is the largest matrix a decode step reads); costs one more copy of the head's weights."""
        self.weight_t = self.weight.detach().t().contiguous()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = hidden @ self.weight_t if self.weight_t is not None else F.linear(hidden, self.weight)
        logits = self.tp.all_gather_last_dim(local)
        return logits[..., : self.vocab_size]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type: {scaling.rope_type!r} is not supported; supported: default, llama3")
    # Llama 3.1: leave high frequencies alone, divide low frequencies by `factor`, blend in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE with a cos/sin table precomputed for every position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim // 2] each
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
