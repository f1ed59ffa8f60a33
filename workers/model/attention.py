"""Paged attention over a ragged batch.

The KV cache of one layer is a pair of tensors [num_blocks * block_size, num_kv_heads, head_dim]; a token at
position p of a request lives in slot block_table[p // block_size] * block_size + p % block_size.

`AttentionBackend` is the seam for a GPU paged-attention kernel: it gets the step's sequences once
(`build_metadata`) and then one call per layer (`forward`) over all tokens of the step. The CPU backend here
gathers each sequence's keys and values through its block table into a padded batch and runs torch SDPA,
once for the decode tokens (one query each) and once for the prefill chunks.
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
class SDPAMetadata:
    # [num_tokens]: cache slot of each new token, in step order (decodes first, then prefill chunks).
    slot_mapping: torch.Tensor
    num_decode_tokens: int
    # Decode group: [num_decodes, max_kv_len] slots to gather, and the keys each query may see.
    decode_kv_slots: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_kv_len] bool
    # Prefill group: padded query rows [num_prefills, max_query_len] indexing the prefill tokens.
    prefill_q_index: torch.Tensor | None
    prefill_q_valid: torch.Tensor | None  # [num_prefills, max_query_len] bool
    prefill_kv_slots: torch.Tensor | None
    prefill_mask: torch.Tensor | None  # [num_prefills, 1, max_query_len, max_kv_len] bool


class AttentionBackend(Protocol):
    def build_metadata(self, spans: list[SeqSpan], block_size: int, device: torch.device) -> object:
        """Per-step tensors shared by all layers. Spans with query_len == 1 must come first."""

    def forward(self, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        """Write k/v for the step's tokens into the cache, return attention output [num_tokens, num_heads, head_dim].

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        """


def _slots(span: SeqSpan, block_size: int, start: int, end: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    table = torch.tensor(span.block_ids, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


class TorchSDPABackend:
    name = "torch_sdpa"

    def build_metadata(self, spans: list[SeqSpan], block_size: int, device: torch.device) -> SDPAMetadata:
        slot_mapping = torch.cat(
            [_slots(s, block_size, s.context_len, s.context_len + s.query_len) for s in spans]
        )
        decodes = [s for s in spans if s.query_len == 1]
        prefills = spans[len(decodes) :]
        assert all(s.query_len > 1 for s in prefills), "decode spans must come first"
        d_slots = d_mask = p_index = p_valid = p_slots = p_mask = None
        if decodes:
            d_slots, d_mask = self._gather_plan(decodes, block_size, query_len=1)
        if prefills:
            p_slots, p_mask = self._gather_plan(prefills, block_size, query_len=max(s.query_len for s in prefills))
            q_lens = torch.tensor([s.query_len for s in prefills])
            offsets = torch.cumsum(q_lens, 0) - q_lens
            rows = torch.arange(int(q_lens.max()))
            p_valid = rows[None, :] < q_lens[:, None]
            p_index = torch.where(p_valid, offsets[:, None] + rows[None, :], 0)
        to = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SDPAMetadata(
            slot_mapping=to(slot_mapping),
            num_decode_tokens=len(decodes),
            decode_kv_slots=to(d_slots),
            decode_mask=to(d_mask),
            prefill_q_index=to(p_index),
            prefill_q_valid=to(p_valid),
            prefill_kv_slots=to(p_slots),
            prefill_mask=to(p_mask),
        )

    @staticmethod
    def _gather_plan(spans: list[SeqSpan], block_size: int, query_len: int):
        kv_lens = torch.tensor([s.context_len + s.query_len for s in spans])
        max_kv = int(kv_lens.max())
        slots = torch.zeros(len(spans), max_kv, dtype=torch.long)
        for i, s in enumerate(spans):
            slots[i, : kv_lens[i]] = _slots(s, block_size, 0, int(kv_lens[i]))
        # Query row r of a span sits at position context_len + r and sees keys [0, context_len + r].
        q_lens = torch.tensor([s.query_len for s in spans])
        q_pos = (kv_lens - q_lens)[:, None] + torch.arange(query_len)[None, :]  # [B, Q]
        # Padded query rows (r >= query_len) see key 0 only, so softmax stays finite; their output is dropped.
        q_pos = torch.where(torch.arange(query_len)[None, :] < q_lens[:, None], q_pos, 0)
        mask = torch.arange(max_kv)[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]
        return slots, mask.unsqueeze(1)

    def forward(self, q, k, v, k_cache, v_cache, meta: SDPAMetadata) -> torch.Tensor:
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        num_d = meta.num_decode_tokens
        parts = []
        if meta.decode_kv_slots is not None:
            parts.append(self._attend(q[:num_d].unsqueeze(1), k_cache, v_cache, meta.decode_kv_slots, meta.decode_mask).squeeze(1))
        if meta.prefill_kv_slots is not None:
            q_p = q[num_d:][meta.prefill_q_index]  # [B, Q, H, D]
            out = self._attend(q_p, k_cache, v_cache, meta.prefill_kv_slots, meta.prefill_mask)
            parts.append(out[meta.prefill_q_valid])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _attend(q, k_cache, v_cache, slots, mask) -> torch.Tensor:
        # q: [B, Q, H, D] -> output [B, Q, H, D]
        keys = k_cache[slots].transpose(1, 2)  # [B, H_kv, L, D]
        values = v_cache[slots].transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)
