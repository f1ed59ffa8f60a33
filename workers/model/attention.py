"""Paged attention over a ragged batch.

The KV cache of one layer is a pair of tensors [num_blocks * block_size, num_kv_heads, head_dim]; a token at
position p of a request lives in slot block_table[p // block_size] * block_size + p % block_size.

`AttentionBackend` is the seam for a GPU paged-attention kernel: it gets the step's sequences once
(`build_metadata`) and then one call per layer (`forward`) over all tokens of the step. The CPU backend here
gathers each sequence's keys and values through its block table into a padded batch and runs torch SDPA, in a
few groups: decodes bucketed by length, and the prefill chunks together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's part of a step: `query_len` new tokens after `context_len` already cached ones."""

    context_len: int
    query_len: int
    block_ids: list[int]


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together in one padded SDPA call."""

    # [B, Q]: index of each query row among the step's tokens (padding rows repeat a valid index).
    token_index: torch.Tensor
    valid: torch.Tensor  # [B, Q] bool: real query rows
    block_table: torch.Tensor  # [B, max_blocks], padded with block 0 (masked)
    mask: torch.Tensor  # [B, 1, Q, max_blocks * block_size] bool: keys each query row may see


@dataclass(frozen=True)
class SDPAMetadata:
    # [num_tokens]: cache slot of each new token, in step order.
    slot_mapping: torch.Tensor
    block_size: int
    groups: list[AttentionGroup]
    # One sequence makes up the whole step, so its group's rows are the step's tokens in order (no scatter).
    single_sequence: bool


class AttentionBackend(Protocol):
    def build_metadata(self, spans: list[SeqSpan], block_size: int, device: torch.device) -> object:
        """Per-step tensors shared by all layers; spans are in the order of the step's tokens."""

    def forward(self, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        """Write k/v for the step's tokens into the cache, return attention output [num_tokens, num_heads, head_dim].

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        """


def _slots(span: SeqSpan, block_size: int, start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(span.block_ids, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


# Fixed cost of one more SDPA call per layer, in padded key rows, and the most calls per step. Tuned on the
# engine benchmark's workload (2-core CPU): (8, 512) gave 135-137 output tok/s, (4, 1024) 126-128, (4, 2048) 126.
_GROUP_COST_ROWS = 512
_MAX_DECODE_GROUPS = 8


def split_by_length(lengths: list[int], max_groups: int = _MAX_DECODE_GROUPS, group_cost: int = _GROUP_COST_ROWS) -> list[int]:
    """Split ascending lengths into contiguous groups, cutting where it saves the most padding.

    A padded batch costs its size times its longest member, plus group_cost for the extra call; a cut is
    kept only if it saves more than that. Returns the end index of each group. O(max_groups * n).
    """
    bounds = [0, len(lengths)]
    for _ in range(max_groups - 1):
        best_gain, best_cut = group_cost, None
        for a, b in zip(bounds, bounds[1:]):
            whole = (b - a) * lengths[b - 1]
            for c in range(a + 1, b):
                gain = whole - (c - a) * lengths[c - 1] - (b - c) * lengths[b - 1]
                if gain > best_gain:
                    best_gain, best_cut = gain, c
        if best_cut is None:
            break
        bounds = sorted(bounds + [best_cut])
    return bounds[1:]


class TorchSDPABackend:
    """Gathers whole blocks (one contiguous copy of block_size * num_kv_heads * head_dim values per block) into a
    padded batch and runs SDPA with a mask. Decodes are sorted by length and bucketed to limit padding; prefill
    chunks form one group. Slots past a sequence's end are masked, so they must only hold finite values: the
    runner zeroes blocks before their first use."""

    name = "torch_sdpa"

    def build_metadata(self, spans: list[SeqSpan], block_size: int, device: torch.device) -> SDPAMetadata:
        slot_mapping = torch.cat([_slots(s, block_size, s.context_len, s.context_len + s.query_len) for s in spans])
        starts, offset = [], 0
        for s in spans:
            starts.append(offset)
            offset += s.query_len
        decodes = sorted((i for i, s in enumerate(spans) if s.query_len == 1), key=lambda i: spans[i].context_len)
        prefills = [i for i, s in enumerate(spans) if s.query_len > 1]
        groups = []
        if decodes:
            lengths = [spans[i].context_len + 1 for i in decodes]
            begin = 0
            for end in split_by_length(lengths):
                groups.append(self._group([spans[i] for i in decodes[begin:end]], [starts[i] for i in decodes[begin:end]], block_size))
                begin = end
        if prefills:
            groups.append(self._group([spans[i] for i in prefills], [starts[i] for i in prefills], block_size))
        to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return SDPAMetadata(
            slot_mapping=to(slot_mapping),
            block_size=block_size,
            groups=[AttentionGroup(*(to(t) for t in (g.token_index, g.valid, g.block_table, g.mask))) for g in groups],
            single_sequence=len(spans) == 1,
        )

    @staticmethod
    def _group(spans: list[SeqSpan], token_starts: list[int], block_size: int) -> AttentionGroup:
        q_lens = torch.tensor([s.query_len for s in spans])
        kv_lens = torch.tensor([s.context_len + s.query_len for s in spans])
        max_q = int(q_lens.max())
        rows = torch.arange(max_q)[None, :]
        valid = rows < q_lens[:, None]  # [B, Q]
        starts = torch.tensor(token_starts)[:, None]
        token_index = torch.where(valid, starts + rows, starts)
        num_blocks = [-(-int(n) // block_size) for n in kv_lens]
        table = torch.zeros(len(spans), max(num_blocks), dtype=torch.long)
        for i, s in enumerate(spans):
            table[i, : num_blocks[i]] = torch.tensor(s.block_ids[: num_blocks[i]])
        # Query row r sits at position context_len + r and sees keys [0, context_len + r]; padded rows see key 0
        # only, so their softmax stays finite (their output is dropped).
        q_pos = torch.where(valid, (kv_lens - q_lens)[:, None] + rows, 0)
        mask = torch.arange(table.shape[1] * block_size)[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]
        return AttentionGroup(token_index, valid, table, mask.unsqueeze(1))

    def forward(self, q, k, v, k_cache, v_cache, meta: SDPAMetadata) -> torch.Tensor:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        if meta.single_sequence:
            g = meta.groups[0]
            return self._attend(q.unsqueeze(0), k_cache, v_cache, g.block_table, g.mask, meta.block_size)[0]
        out = torch.empty_like(q)
        for g in meta.groups:
            res = self._attend(q[g.token_index], k_cache, v_cache, g.block_table, g.mask, meta.block_size)
            out[g.token_index[g.valid]] = res[g.valid]
        return out

    @staticmethod
    def _attend(q, k_cache, v_cache, block_table, mask, block_size: int) -> torch.Tensor:
        # q: [B, Q, H, D] -> output [B, Q, H, D]
        _, num_kv_heads, head_dim = k_cache.shape
        batch, max_blocks = block_table.shape
        flat = block_table.view(-1)

        def gather(cache):  # whole blocks, as one contiguous copy each -> [B, H_kv, max_blocks * block_size, D]
            blocks = cache.view(-1, block_size * num_kv_heads * head_dim).index_select(0, flat)
            return blocks.view(batch, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(q.transpose(1, 2), gather(k_cache), gather(v_cache), attn_mask=mask,
                                             enable_gqa=True)
        return out.transpose(1, 2)
