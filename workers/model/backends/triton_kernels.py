"""Triton kernels for the GPU decode path: KV-cache store and paged decode attention.

The KV cache of one layer is a pair k_cache, v_cache of [num_slots, num_kv_heads, head_dim] (num_slots =
num_blocks * block_size); a token at position p of a sequence lives in slot
block_table[p // block_size] * block_size + p % block_size.

Decode attention is split in two kernels, as in flash-decoding:

  _decode_kernel   one program per (sequence, kv head, split). It holds every query head of its kv head (GQA
                   packed, the group padded to a tl.dot tile), so each KV block is read once per kv head, and
                   walks a contiguous range of the sequence's blocks with an online softmax in fp32. With one
                   split it writes the output; with more it writes a partial output and its log-sum-exp.
  _reduce_kernel   one program per (sequence, query head): merges the splits' partials by their log-sum-exp.

Every launch is CUDA-graph safe: the grid depends only on shapes and num_splits, sequence lengths are read in
the kernels, and nothing syncs with the host.

Only this module imports triton. Without CUDA it switches Triton to its interpreter (before the kernels below are
decorated: @triton.jit reads the knob then), so the kernels run, slowly, on CPU tensors for tests. On such a
machine this module must be imported before anything imports triton; otherwise importing it raises RuntimeError.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton reads TRITON_INTERPRET (triton.knobs.runtime.interpret) when @triton.jit decorates a function, and
    # triton.language decorates its own helpers (tl.cdiv, tl.sum, tl.max...) when triton is first imported: the
    # variable must be set before that, not merely before our kernels.
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
    raise RuntimeError("triton was imported without TRITON_INTERPRET=1 on a machine without CUDA, so its kernels "
                       "cannot run; import workers.model.backends.triton_kernels before triton, or set the variable")
_INTERPRET = triton.knobs.runtime.interpret

# Keys per step of the decode loop. Each step loads a [TILE, head_dim] slab of K and of V; 64 keys keep a
# tl.dot tile full and a few loads in flight without many registers. A block larger than that is one step.
_MIN_TILE_LEN = 64
# tl.dot needs every dimension to be at least 16.
_MIN_DOT_DIM = 16
# The reduce kernel holds all splits of a head at once.
MAX_NUM_SPLITS = 64
# Programs per SM to aim for when choosing splits: at two or more, an SM has another program's loads in flight
# while one waits, which a bandwidth-bound kernel needs.
_PROGRAMS_PER_SM = 2

_LOG2_E = 1.4426950408889634


# --- store -----------------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_k_dim,
    stride_v_tok, stride_v_head, stride_v_dim,
    stride_kc_slot, stride_kc_head, stride_kc_dim,
    stride_vc_slot, stride_vc_head, stride_vc_dim,
    num_kv_heads, head_dim,
    HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    # A padding token (slot -1) masks every lane: nothing is read or written.
    mask = (heads < num_kv_heads) & (dims < head_dim) & (slot >= 0)
    row = token.to(tl.int64)
    k = tl.load(k_ptr + row * stride_k_tok + heads * stride_k_head + dims * stride_k_dim, mask=mask)
    v = tl.load(v_ptr + row * stride_v_tok + heads * stride_v_head + dims * stride_v_dim, mask=mask)
    tl.store(k_cache_ptr + slot * stride_kc_slot + heads * stride_kc_head + dims * stride_kc_dim, k, mask=mask)
    tl.store(v_cache_ptr + slot * stride_vc_slot + heads * stride_vc_head + dims * stride_vc_dim, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write each token's key and value into its cache slot, in one kernel launch.

    k, v: [num_tokens, num_kv_heads, head_dim], the caches' dtype (any strides).
    k_cache, v_cache: [num_slots, num_kv_heads, head_dim].
    slot_mapping: [num_tokens] int32 or int64, the slot of each token; -1 marks a padding token, whose row is
    skipped (the cache is left as it was).
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        num_kv_heads, head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )


# --- decode attention ------------------------------------------------------------------------------------------


@triton.jit
def _attend_tile(q, m_i, l_i, acc, tile_start, end, table_row, k_cache_ptr, v_cache_ptr, kv_head, dims, dim_mask,
                 stride_kc_slot, stride_kc_head, stride_kc_dim, stride_vc_slot, stride_vc_head, stride_vc_dim,
                 qk_scale_log2,
                 BLOCK_SIZE: tl.constexpr, TILE_LEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """One online-softmax step over keys [tile_start, min(tile_start + TILE_LEN, end)); returns m_i, l_i, acc."""
    pos = tile_start + tl.arange(0, TILE_LEN)
    key_mask = pos < end
    # Entries past the sequence's blocks are never read, so the table may hold anything there.
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
    kv_mask = key_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_cache_ptr + slot[:, None] * stride_kc_slot + kv_head * stride_kc_head
                + dims[None, :] * stride_kc_dim, mask=kv_mask, other=0.0)  # [TILE_LEN, HEAD_DIM_PAD]
    v = tl.load(v_cache_ptr + slot[:, None] * stride_vc_slot + kv_head * stride_vc_head
                + dims[None, :] * stride_vc_dim, mask=kv_mask, other=0.0)
    if INTERPRET:
        # Triton 3.6's interpreter multiplies bfloat16's raw bits in tl.dot; it gets fp32 copies instead.
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [GROUP_PAD, TILE_LEN]
    scores = tl.where(key_mask[None, :], scores, float("-inf"))
    # Every tile has a valid key (tile_start < end), so m_new is finite and no row turns into NaN.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    stride_q_seq, stride_q_head, stride_q_dim,
    stride_kc_slot, stride_kc_head, stride_kc_dim,
    stride_vc_slot, stride_vc_head, stride_vc_dim,
    stride_bt_seq,
    stride_o_seq, stride_o_head, stride_o_dim,
    qk_scale_log2,  # softmax scale * log2(e): the softmax runs in base 2
    group_size, head_dim,
    NUM_SPLITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_LEN: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this kv head; rows past the group are padding
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = rows < group_size
    dim_mask = dims < head_dim
    heads = kv_head * group_size + rows

    # Splits cut the sequence at tile boundaries (whole blocks: TILE_LEN is a multiple of BLOCK_SIZE), so every
    # tile but the sequence's last is full. A split past the sequence's end has an empty range.
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_LEN)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    start = split * tiles_per_split * TILE_LEN
    end = tl.minimum(start + tiles_per_split * TILE_LEN, seq_len)

    q_offs = seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :] * stride_q_dim
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [GROUP_PAD, HEAD_DIM_PAD]
    # tl.dot's operands share a dtype (the interpreter's dot in fp32: see _attend_tile).
    if INTERPRET:
        q = q.to(tl.float32)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    if INTERPRET:
        # Triton 3.6's interpreter turns a tensor loop bound into int() of a 1-element array, which numpy >= 2.4
        # refuses; a while loop only needs its truth value. Compiled, the for loop keeps software pipelining.
        tile_start = start
        while tile_start < end:
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile_start, end, table_row, k_cache_ptr, v_cache_ptr, kv_head, dims, dim_mask,
                stride_kc_slot, stride_kc_head, stride_kc_dim, stride_vc_slot, stride_vc_head, stride_vc_dim,
                qk_scale_log2, BLOCK_SIZE, TILE_LEN, DOT_PRECISION, INTERPRET)
            tile_start += TILE_LEN
    else:
        for tile_start in range(start, end, TILE_LEN):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, tile_start, end, table_row, k_cache_ptr, v_cache_ptr, kv_head, dims, dim_mask,
                stride_kc_slot, stride_kc_head, stride_kc_dim, stride_vc_slot, stride_vc_head, stride_vc_dim,
                qk_scale_log2, BLOCK_SIZE, TILE_LEN, DOT_PRECISION, INTERPRET)

    # An empty range (a padding row of seq_len 0, or a split past a short sequence) leaves l_i = 0: its output
    # is zero and its log-sum-exp -inf, so the merge gives it no weight.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        o_offs = seq.to(tl.int64) * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :] * stride_o_dim
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Workspaces are contiguous: part_out [batch, num_heads, NUM_SPLITS, HEAD_DIM_PAD], part_lse
        # [batch, num_heads, NUM_SPLITS]; the program's heads are consecutive rows of num_heads.
        num_heads = tl.num_programs(1) * group_size
        lse_offs = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + lse_offs, lse, mask=row_mask)
        tl.store(part_out_ptr + lse_offs[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=out_mask)


@triton.jit
def _reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_o_seq, stride_o_head, stride_o_dim,
    head_dim,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    row = seq.to(tl.int64) * tl.num_programs(1) + head  # (seq, head) row of the workspaces

    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + splits, mask=splits < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # All splits empty (seq_len 0): weight nothing rather than exp2(-inf - -inf) = NaN.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)  # [SPLITS_PAD]; 0 for empty and padding splits
    total = tl.sum(weight, axis=0)
    part = tl.load(part_out_ptr + (row * NUM_SPLITS + splits[:, None]) * HEAD_DIM_PAD + dims[None, :],
                   mask=splits[:, None] < NUM_SPLITS, other=0.0)  # [SPLITS_PAD, HEAD_DIM_PAD]
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    o_offs = seq.to(tl.int64) * stride_o_seq + head * stride_o_head + dims * stride_o_dim
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, scale: float,
                           num_splits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its keys in the paged cache.

    q: [batch, num_heads, head_dim], already rotary-embedded (any strides); num_heads = num_kv_heads * group.
    k_cache, v_cache: [num_slots, num_kv_heads, head_dim], float32, bfloat16 or float16; the current token's
    key and value are already stored.
    block_tables: [batch, max_blocks] int32, each sequence's block ids; entries past its last block are ignored.
    seq_lens: [batch] int32, the keys each sequence attends (the current token included); 0 marks a padding row,
    whose output is zeros.
    block_size: slots per block, a power of two (1..128); scale: softmax scale (usually head_dim ** -0.5).
    num_splits: programs per (sequence, kv head), each over a contiguous range of blocks (choose_num_splits),
    1..MAX_NUM_SPLITS. Ranges are cut at whole tiles of max(block_size, 64) keys, so a sequence shorter than
    num_splits tiles leaves the last splits empty (harmless). Above 1, partials go to fp32 workspaces allocated
    here per call ([batch, num_heads, num_splits, head_dim rounded up to a power of two] and its lse) and a second
    kernel merges them.
    out: optional [batch, num_heads, head_dim] to write into.

    Returns [batch, num_heads, head_dim] in q's dtype (or `out`). No host sync: safe under CUDA-graph capture,
    where the workspaces come from the graph's pool.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if not 1 <= num_splits <= MAX_NUM_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_NUM_SPLITS}], got {num_splits}")
    if out is None:
        out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group_size = num_heads // num_kv_heads
    head_dim_pad = max(triton.next_power_of_2(head_dim), _MIN_DOT_DIM)
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused: the kernel writes `out` directly
    # On the GPU, fp32 operands of tl.dot would otherwise be rounded to tf32.
    dot_precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        out, part_out, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        scale * _LOG2_E, group_size, head_dim,
        NUM_SPLITS=num_splits, BLOCK_SIZE=block_size, TILE_LEN=max(block_size, _MIN_TILE_LEN),
        GROUP_PAD=max(triton.next_power_of_2(group_size), _MIN_DOT_DIM), HEAD_DIM_PAD=head_dim_pad,
        DOT_PRECISION=dot_precision, INTERPRET=_INTERPRET,
    )
    if num_splits > 1:
        _reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, *out.stride(), head_dim,
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM_PAD=head_dim_pad,
        )
    return out


def choose_num_splits(batch_size: int, num_kv_heads: int, max_num_blocks: int, num_sms: int) -> int:
    """Splits per (sequence, kv head) for paged_decode_attention, from static sizes only (one choice per CUDA-graph
    batch bucket, so it must not look at actual lengths).

    Decode attention is bandwidth-bound: it needs enough programs in flight to keep every SM's loads busy.
    batch_size * num_kv_heads programs already do when they reach _PROGRAMS_PER_SM per SM; then splitting only
    adds the reduce kernel and its workspace traffic, so the answer is 1. Below that, split each sequence into
    enough pieces to reach the target, but never into more pieces than it has blocks (max_num_blocks bounds
    every sequence's length in the bucket; a split with no blocks is a wasted program) nor past MAX_NUM_SPLITS.
    """
    num_programs = batch_size * num_kv_heads
    target = _PROGRAMS_PER_SM * num_sms
    if num_programs <= 0 or num_programs >= target:
        return 1
    return max(1, min(-(-target // num_programs), max_num_blocks, MAX_NUM_SPLITS))
