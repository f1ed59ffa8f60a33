"""Triton decode kernels against a plain-torch reference: on CPU through Triton's interpreter, on CUDA compiled.

The interpreter runs every program in Python, so the CPU cases are small; one case is still ragged, GQA-packed,
split, and padded at once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Import the kernels module first: on a machine without CUDA it must set TRITON_INTERPRET before triton loads.
tk = pytest.importorskip("workers.model.backends.triton_kernels")
pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_paged_kv(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  device: str = "cpu", seed: int = 0):
    """Random caches and shuffled block tables for seq_lens. Every slot no sequence owns holds NaN, and table
    entries past a sequence's last block point at such a slot's block: reading anything outside the sequence
    shows up as NaN in the output."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1  # the last block is never owned: the table's padding
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    block_ids = torch.randperm(num_blocks - 1, generator=gen).tolist()
    max_blocks = max(max(blocks_per_seq), 1) + 1
    block_tables = torch.full((len(seq_lens), max_blocks), num_blocks - 1, dtype=torch.int32)
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids, block_ids = block_ids[:nb], block_ids[nb:]
        block_tables[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        slots = slots_of(block_tables[i], n, block_size)
        k_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return (t.to(device) for t in (k_cache, v_cache, block_tables, seq_lens_t))


def slots_of(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(seq_len, device=block_table.device)
    return block_table.long()[pos // block_size] * block_size + pos % block_size


def reference_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size: int, scale: float) -> torch.Tensor:
    """Each sequence's keys gathered through its block table, softmax in fp32; zeros for seq_len 0."""
    batch, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        slots = slots_of(block_tables[i], n, block_size)
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [n, num_heads, head_dim]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[i].float(), k) * scale).softmax(dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", probs, v)
    return out


# (block_size, head_dim, num_heads, num_kv_heads, seq_lens): ragged, padding rows (0), lengths on (16, 80, 64)
# and off block boundaries, a single token (1), and more tiles than one (130 > 64 keys per tile).
DECODE_CASES = {
    "block16-d64-gqa4": (16, 64, 8, 2, [37, 0, 80, 16]),
    "block4-d48-mha": (4, 48, 4, 4, [1, 130, 0, 64]),
    "block1-d32-gqa2": (1, 32, 4, 2, [9, 70]),
}


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_paged_decode_matches_reference(case, num_splits):
    block_size, head_dim, num_heads, num_kv_heads, seq_lens = DECODE_CASES[case]
    k_cache, v_cache, block_tables, seq_lens_t = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim,
                                                               torch.float32)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5

    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, scale, num_splits)

    expected = reference_decode(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_paged_decode_writes_into_out_from_strided_q():
    # q as the engine slices it out of a fused qkv projection: not contiguous.
    block_size, head_dim, num_heads, num_kv_heads, seq_lens = 8, 64, 8, 2, [20, 3]
    k_cache, v_cache, block_tables, seq_lens_t = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim,
                                                               torch.float32)
    qkv = torch.randn(len(seq_lens), (num_heads + 2 * num_kv_heads) * head_dim)
    q = qkv[:, : num_heads * head_dim].view(len(seq_lens), num_heads, head_dim)
    out = torch.full_like(q, float("nan"))

    result = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, 0.1, 2, out=out)

    assert result is out
    expected = reference_decode(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, 0.1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_paged_decode_bfloat16_cache():
    block_size, head_dim, num_heads, num_kv_heads, seq_lens = 16, 64, 8, 2, [50, 0]
    k_cache, v_cache, block_tables, seq_lens_t = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim,
                                                               torch.bfloat16)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1)).bfloat16()

    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, 0.125, 2)

    assert out.dtype == torch.bfloat16
    expected = reference_decode(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, 0.125)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kv_writes_slots_and_skips_padding(slot_dtype):
    num_slots, num_kv_heads, head_dim = 12, 2, 48
    k_cache = torch.zeros(num_slots, num_kv_heads, head_dim)
    v_cache = torch.zeros(num_slots, num_kv_heads, head_dim)
    # k and v as views of one fused projection output (row stride != num_kv_heads * head_dim).
    kv = torch.randn(4, 2 * num_kv_heads * head_dim + 5)
    k = kv[:, : num_kv_heads * head_dim].view(4, num_kv_heads, head_dim)
    v = kv[:, num_kv_heads * head_dim: 2 * num_kv_heads * head_dim].view(4, num_kv_heads, head_dim)
    slot_mapping = torch.tensor([7, -1, 0, 11], dtype=slot_dtype)

    tk.store_kv(k, v, k_cache, v_cache, slot_mapping)

    written = torch.tensor([7, 0, 11])
    torch.testing.assert_close(k_cache[written], k[[0, 2, 3]], atol=0, rtol=0)
    torch.testing.assert_close(v_cache[written], v[[0, 2, 3]], atol=0, rtol=0)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[written] = False
    assert (k_cache[untouched] == 0).all() and (v_cache[untouched] == 0).all()


def test_store_kv_into_a_layer_slice_of_the_engine_cache():
    # The engine's layout: [num_layers, 2, num_slots, num_kv_heads, head_dim]; other layers stay untouched.
    kv_cache = torch.zeros(3, 2, 8, 2, 16)
    k = torch.randn(2, 2, 16)
    v = torch.randn(2, 2, 16)

    tk.store_kv(k, v, kv_cache[1, 0], kv_cache[1, 1], torch.tensor([5, 2]))

    torch.testing.assert_close(kv_cache[1, 0, [5, 2]], k, atol=0, rtol=0)
    torch.testing.assert_close(kv_cache[1, 1, [5, 2]], v, atol=0, rtol=0)
    assert kv_cache[[0, 2]].abs().sum() == 0


def test_choose_num_splits():
    num_sms = 132
    # Enough (sequence, kv head) programs already: no split.
    assert tk.choose_num_splits(64, 8, 128, num_sms) == 1
    assert tk.choose_num_splits(256, 8, 128, num_sms) == 1
    # One sequence: split until the GPU is filled...
    splits = tk.choose_num_splits(1, 8, 128, num_sms)
    assert splits > 1 and 8 * splits >= 2 * num_sms
    # ...but never into more pieces than blocks, nor past the reduce kernel's limit.
    assert tk.choose_num_splits(1, 8, 3, num_sms) == 3
    assert tk.choose_num_splits(1, 1, 10_000, num_sms) == tk.MAX_NUM_SPLITS
    assert tk.choose_num_splits(1, 8, 0, num_sms) == 1
    for batch in (1, 2, 4, 8, 16, 32, 64, 128, 512):
        for max_blocks in (1, 2, 16, 128, 1024):
            splits = tk.choose_num_splits(batch, 8, max_blocks, num_sms)
            assert 1 <= splits <= max(1, min(max_blocks, tk.MAX_NUM_SPLITS))
    # More sequences never ask for more splits.
    assert [tk.choose_num_splits(b, 8, 128, num_sms) for b in (1, 2, 4, 8, 16, 32)] == sorted(
        (tk.choose_num_splits(b, 8, 128, num_sms) for b in (1, 2, 4, 8, 16, 32)), reverse=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter switch on a machine without CUDA")
def test_import_switches_triton_to_its_interpreter_without_cuda():
    # A fresh process with no TRITON_INTERPRET: importing the module alone must make the kernels run on CPU.
    script = textwrap.dedent("""
        import torch
        from workers.model.backends import triton_kernels as tk
        k_cache = torch.zeros(4, 1, 16)
        v_cache = torch.zeros(4, 1, 16)
        tk.store_kv(torch.ones(1, 1, 16), torch.ones(1, 1, 16), k_cache, v_cache, torch.tensor([2]))
        assert k_cache[2].eq(1).all() and k_cache[[0, 1, 3]].eq(0).all()
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.gpu
def test_paged_decode_bfloat16_cuda_llama3_8b_shapes():
    block_size, head_dim, num_heads, num_kv_heads, batch = 16, 128, 32, 8, 64
    gen = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(1900, 2200, (batch,), generator=gen).tolist()
    seq_lens[3] = 0  # a padding row
    seq_lens[5] = 2048  # on a block boundary
    k_cache, v_cache, block_tables, seq_lens_t = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim,
                                                               torch.bfloat16, device="cuda")
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    scale = head_dim**-0.5
    expected = reference_decode(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, scale)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = tk.choose_num_splits(batch, num_kv_heads, block_tables.shape[1], num_sms)

    for num_splits in sorted({1, 4, chosen}):
        out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, scale,
                                        num_splits)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)

    # Under CUDA-graph capture (workspaces from the graph's pool), replayed with new lengths.
    out = torch.empty_like(q)
    tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, scale, 4, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, scale, 4, out=out)
    seq_lens_t.copy_(seq_lens_t // 2)
    graph.replay()
    expected = reference_decode(q, k_cache, v_cache, block_tables, seq_lens_t, block_size, scale)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)

    # store_kv on CUDA: the new token's key and value land in its slot.
    k_new = torch.randn(batch, num_kv_heads, head_dim, device="cuda").bfloat16()
    slots = torch.arange(batch, device="cuda") * 3
    tk.store_kv(k_new, k_new, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache[slots], k_new, atol=0, rtol=0)
