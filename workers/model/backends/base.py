"""The attention seam: what a backend gets per step and per layer.

The KV cache of one layer is a pair of tensors [num_blocks * block_size, num_kv_heads, head_dim]; a token at
position p of a request lives in slot block_table[p // block_size] * block_size + p % block_size.

A backend gets the step's sequences once (`build_metadata`) and then one call per layer (`forward`) over all
tokens of the step. Decode-only batches can also be described by tensors alone (`build_decode_metadata`): that
is what a CUDA graph replays, with the tensors living in the graph runner's static buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's part of a step: `query_len` new tokens after `context_len` already cached ones."""

    context_len: int
    query_len: int
    block_ids: list[int]


@dataclass(frozen=True)
class DecodeMetadata:
    """A decode-only batch (one new token per row) described by device tensors only, so it can be replayed.

    Padding rows (a CUDA-graph bucket larger than the batch) have slot -1 (nothing is stored), seq_len 0 (their
    output is garbage-free zeros or a finite value, and is dropped) and block-table row 0.
    """

    slot_mapping: torch.Tensor  # [batch] int64: cache slot of each row's new token; -1 = padding
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    seq_lens: torch.Tensor  # [batch] int32: keys each row attends, its new token included; 0 = padding
    block_size: int


class AttentionBackend(Protocol):
    name: str

    def build_metadata(self, spans: list[SeqSpan], block_size: int, device: torch.device) -> object:
        """Per-step tensors shared by all layers; spans are in the order of the step's tokens."""

    def build_decode_metadata(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              block_size: int) -> object:
        """Metadata for a decode-only batch from device tensors (see DecodeMetadata), with no host work or sync.

        Any tensor it derives is computed by device ops on the given tensors, so a CUDA graph must capture this
        call together with the forward pass: a replay then derives them again from the buffers' new contents.
        """

    def forward(self, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        """Write k/v for the step's tokens into the cache, return attention output [num_tokens, num_heads, head_dim].

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        """


def slots_of(span: SeqSpan, block_size: int, start: int, end: int) -> torch.Tensor:
    """[end - start] int64: cache slots of the span's positions start..end-1."""
    pos = torch.arange(start, end)
    table = torch.tensor(span.block_ids, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def step_slots(spans: list[SeqSpan], block_size: int) -> tuple[torch.Tensor, list[int]]:
    """The step's slot_mapping [num_tokens] int64, in step order, and where each span's tokens start in it."""
    slot_mapping = torch.cat([slots_of(s, block_size, s.context_len, s.context_len + s.query_len) for s in spans])
    starts, offset = [], 0
    for s in spans:
        starts.append(offset)
        offset += s.query_len
    return slot_mapping, starts


def decode_tensors(spans: list[SeqSpan], block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors of a decode-only batch: slot_mapping [B] int64, block_tables [B, max_blocks] int32 (padded
    with block 0), seq_lens [B] int32."""
    seq_lens = [s.context_len + 1 for s in spans]
    num_blocks = [-(-n // block_size) for n in seq_lens]
    table = torch.zeros(len(spans), max(num_blocks), dtype=torch.int32)
    for i, s in enumerate(spans):
        table[i, : num_blocks[i]] = torch.tensor(s.block_ids[: num_blocks[i]], dtype=torch.int32)
    slots = torch.cat([slots_of(s, block_size, s.context_len, s.context_len + 1) for s in spans])
    return slots, table, torch.tensor(seq_lens, dtype=torch.int32)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to the device without blocking the host: through pinned memory on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
