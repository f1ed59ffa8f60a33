"""The portable attention backend: gathers each sequence's blocks into a padded batch and runs torch SDPA.

Used on CPU (where it is the fast path) and wherever `attention_backend="sdpa"` is asked for. Decodes are bucketed
by length and the prefill chunks grouped, so a step makes a few SDPA calls per layer; results go back to the
step's token order through integer indices (no boolean-mask indexing, which would sync a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.backends.base import DecodeMetadata, SeqSpan, step_slots, to_device


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together in one padded SDPA call."""

    # [B, Q]: index of each query row among the step's tokens (padding rows repeat a valid index).
    token_index: torch.Tensor
    # The real query rows: row src_rows[i] of the flattened [B * Q] output is step token dest_index[i].
    src_rows: torch.Tensor  # [num_real] int64
    dest_index: torch.Tensor  # [num_real] int64
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


@dataclass(frozen=True)
class SDPADecodeMetadata:
    """A decode-only batch over static tensors (see DecodeMetadata), with the derived tensors SDPA needs."""

    decode: DecodeMetadata
    store_slots: torch.Tensor  # [B] int64: slot_mapping with padding (-1) sent to slot 0
    is_pad: torch.Tensor  # [B, 1, 1] bool
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] bool


class TorchSDPABackend:
    """Gathers whole blocks (one contiguous copy of block_size * num_kv_heads * head_dim values per block) into a
    padded batch and runs SDPA with a mask. Decodes are sorted by length and bucketed to limit padding; prefill
    chunks form one group. Slots past a sequence's end are masked, so they must only hold finite values: the
    runner zeroes blocks before their first use."""

    name = "sdpa"

    def build_metadata(self, spans: list[SeqSpan], block_size: int, device: torch.device) -> SDPAMetadata:
        slot_mapping, starts = step_slots(spans, block_size)
        decodes = sorted((i for i, s in enumerate(spans) if s.query_len == 1), key=lambda i: spans[i].context_len)
        prefills = [i for i, s in enumerate(spans) if s.query_len > 1]
        groups = []
        if decodes:
            lengths = [spans[i].context_len + 1 for i in decodes]
            begin = 0
            for end in split_by_length(lengths):
                groups.append(self.group([spans[i] for i in decodes[begin:end]], [starts[i] for i in decodes[begin:end]], block_size))
                begin = end
        if prefills:
            groups.append(self.group([spans[i] for i in prefills], [starts[i] for i in prefills], block_size))
        return SDPAMetadata(
            slot_mapping=to_device(slot_mapping, device),
            block_size=block_size,
            groups=[group_to(g, device) for g in groups],
            single_sequence=len(spans) == 1,
        )

    @staticmethod
    def group(spans: list[SeqSpan], token_starts: list[int], block_size: int) -> AttentionGroup:
        """Host tensors for one padded SDPA call over `spans`, whose tokens start at `token_starts` in the step."""
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
        src_rows = valid.flatten().nonzero().squeeze(1)  # host tensors: no device sync
        return AttentionGroup(token_index, src_rows, token_index.flatten()[src_rows], table, mask.unsqueeze(1))

    def build_decode_metadata(self, slot_mapping, block_tables, seq_lens, block_size: int) -> SDPADecodeMetadata:
        num_keys = block_tables.shape[1] * block_size
        keys = torch.arange(num_keys, device=seq_lens.device)
        # Padding rows (seq_len 0) see key 0 only, so their softmax stays finite.
        mask = (keys[None, :] < seq_lens[:, None]) | (keys[None, :] == 0)
        return SDPADecodeMetadata(
            decode=DecodeMetadata(slot_mapping, block_tables, seq_lens, block_size),
            store_slots=slot_mapping.clamp(min=0),
            is_pad=(slot_mapping < 0).view(-1, 1, 1),
            mask=mask.view(-1, 1, 1, num_keys),
        )

    def forward(self, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        if isinstance(meta, SDPADecodeMetadata):
            return self._forward_decode(q, k, v, k_cache, v_cache, meta)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        if meta.single_sequence:
            g = meta.groups[0]
            return attend(q.unsqueeze(0), k_cache, v_cache, g.block_table, g.mask, meta.block_size)[0]
        out = torch.empty_like(q)
        for g in meta.groups:
            scatter_group(out, g, attend(q[g.token_index], k_cache, v_cache, g.block_table, g.mask, meta.block_size))
        return out

    @staticmethod
    def _forward_decode(q, k, v, k_cache, v_cache, meta: SDPADecodeMetadata) -> torch.Tensor:
        # A padding row rewrites slot 0 with the value it already holds. Slot 0 is position 0 of some sequence,
        # which a decode token never is, so no real row of the batch writes it too.
        slots = meta.store_slots
        k_cache.index_copy_(0, slots, torch.where(meta.is_pad, k_cache.index_select(0, slots), k))
        v_cache.index_copy_(0, slots, torch.where(meta.is_pad, v_cache.index_select(0, slots), v))
        d = meta.decode
        return attend(q.unsqueeze(1), k_cache, v_cache, d.block_tables.long(), meta.mask, d.block_size)[:, 0]


def group_to(g: AttentionGroup, device: torch.device) -> AttentionGroup:
    return AttentionGroup(*(to_device(t, device) for t in (g.token_index, g.src_rows, g.dest_index, g.block_table, g.mask)))


def scatter_group(out: torch.Tensor, g: AttentionGroup, res: torch.Tensor) -> None:
    """Write a group's real rows of res [B, Q, H, D] into out [num_tokens, H, D] at their step positions."""
    out.index_copy_(0, g.dest_index, res.flatten(0, 1).index_select(0, g.src_rows))


def attend(q, k_cache, v_cache, block_table, mask, block_size: int) -> torch.Tensor:
    """q [B, Q, H, D] against the blocks of block_table [B, max_blocks] (int64) under mask -> [B, Q, H, D]."""
    _, num_kv_heads, head_dim = k_cache.shape
    batch, max_blocks = block_table.shape
    flat = block_table.reshape(-1)

    def gather(cache):  # whole blocks, as one contiguous copy each -> [B, H_kv, max_blocks * block_size, D]
        blocks = cache.view(-1, block_size * num_kv_heads * head_dim).index_select(0, flat)
        return blocks.view(batch, max_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(q.transpose(1, 2), gather(k_cache), gather(v_cache), attn_mask=mask,
                                         enable_gqa=True)
    return out.transpose(1, 2)
