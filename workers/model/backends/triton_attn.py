"""The CUDA attention backend: Triton kernels for the KV store and paged decode, SDPA for prefill chunks.

Decode rows go to `paged_decode_attention` (GQA-packed, split-KV; workers/model/backends/triton_kernels.py),
which reads the cache through block tables in place; a step's prefill chunks keep the SDPA path over gathered
blocks (backends/sdpa.py), the fastest prefill measured so far. Every token's k/v is stored by one `store_kv`
launch per layer that skips padding slots (-1). Without CUDA the kernels run in Triton's interpreter: correct
and slow, for tests only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.model.backends import triton_kernels as kernels
from workers.model.backends.base import DecodeMetadata, SeqSpan, decode_tensors, step_slots, to_device
from workers.model.backends.sdpa import AttentionGroup, TorchSDPABackend, attend, group_to, scatter_group


@dataclass(frozen=True)
class TritonMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, step order
    block_size: int
    decode: DecodeMetadata | None  # the step's decode rows, if any
    # Step positions of the decode rows; None when the step is only decodes (rows are the step's tokens).
    decode_index: torch.Tensor | None
    prefill: AttentionGroup | None  # the step's prefill chunks, one padded SDPA call


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, device: torch.device):
        # Programs per SM the split-KV heuristic aims for are counted against the SMs of this device.
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4

    def build_metadata(self, spans: list[SeqSpan], block_size: int, device: torch.device) -> TritonMetadata:
        slot_mapping, starts = step_slots(spans, block_size)
        decodes = [i for i, s in enumerate(spans) if s.query_len == 1]
        prefills = [i for i, s in enumerate(spans) if s.query_len > 1]
        decode = decode_index = prefill = None
        if decodes:
            slots, table, seq_lens = decode_tensors([spans[i] for i in decodes], block_size)
            decode = DecodeMetadata(to_device(slots, device), to_device(table, device), to_device(seq_lens, device), block_size)
            if prefills:
                decode_index = to_device(torch.tensor([starts[i] for i in decodes]), device)
        if prefills:
            group = TorchSDPABackend.group([spans[i] for i in prefills], [starts[i] for i in prefills], block_size)
            prefill = group_to(group, device)
        return TritonMetadata(to_device(slot_mapping, device), block_size, decode, decode_index, prefill)

    def build_decode_metadata(self, slot_mapping, block_tables, seq_lens, block_size: int) -> TritonMetadata:
        decode = DecodeMetadata(slot_mapping, block_tables, seq_lens, block_size)
        return TritonMetadata(slot_mapping, block_size, decode, None, None)

    def forward(self, q, k, v, k_cache, v_cache, meta: TritonMetadata) -> torch.Tensor:
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.prefill is None:  # decodes only: the step's rows in order
            return self._decode(q, k_cache, v_cache, meta.decode)
        out = torch.empty_like(q)
        g = meta.prefill
        scatter_group(out, g, attend(q[g.token_index], k_cache, v_cache, g.block_table, g.mask, meta.block_size))
        if meta.decode is not None:
            out.index_copy_(0, meta.decode_index, self._decode(q.index_select(0, meta.decode_index), k_cache, v_cache,
                                                               meta.decode))
        return out

    def _decode(self, q, k_cache, v_cache, d: DecodeMetadata) -> torch.Tensor:
        batch, max_blocks = d.block_tables.shape
        num_splits = kernels.choose_num_splits(batch, k_cache.shape[1], max_blocks, self.num_sms)
        return kernels.paged_decode_attention(q, k_cache, v_cache, d.block_tables, d.seq_lens, d.block_size,
                                              q.shape[-1] ** -0.5, num_splits)
