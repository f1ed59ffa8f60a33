"""Decode-only steps replayed as CUDA graphs, one graph per padded batch size ("bucket").

A decode step launches a few kernels per layer on a tiny batch, so on a GPU its time goes to launches, not math.
A captured graph replays them all with one launch. Graphs are static: each bucket's graph reads fixed addresses,
so every step goes through one set of static buffers (views `buf[:bs]` serve every bucket), and a batch is
padded up to the smallest bucket that holds it. Padding rows have input id 0, position 0, slot -1 (nothing
stored), seq_len 0 and an all-zero block-table row; their logits are computed and dropped.

A step costs one host-to-device copy (the step's rows, built in one pinned staging tensor) and one replay; the
graph itself unpacks the staged rows into the typed buffers. Steps with a prefill chunk, and batches above the
largest bucket, run eagerly (ModelRunner.execute decides with `supports`).

As in vLLM (gpu_model_runner.capture_model), nano-vllm (ModelRunner.capture_cudagraph) and SGLang
(CudaGraphRunner): buckets are captured largest first into one shared memory pool, so smaller graphs reuse the
largest one's memory, after an eager warm-up run of each (which also compiles Triton kernels and sets up cuBLAS).
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

log = logging.getLogger(__name__)

# Columns of the staging tensor; the block table fills the rest of each row.
_ID, _POS, _SLOT, _LEN, _SAMPLE, _TABLE = range(6)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs, plus max_num_seqs itself when off that ladder.

    vLLM's default ladder (CompilationConfig.cudagraph_capture_sizes: [1, 2, 4] + range(8, 256, 8), then steps
    of 16) sized to the scheduler's max_num_seqs, so every decode batch the scheduler can form has a bucket, and
    padding wastes at most 7 rows.
    """
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
    sizes = [n for n in [1, 2, 4, *range(8, max_num_seqs + 1, 8)] if n <= max_num_seqs]
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class Graph(Protocol):
    """One captured computation. `capture(fn)` records fn() and returns its output tensor; `replay()` reruns
    the recording, rewriting that same tensor in place from the current contents of fn's input buffers."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def replay(self) -> None: ...


class CUDAGraph:
    """A torch.cuda.CUDAGraph captured into a memory pool shared with the other buckets."""

    def __init__(self, pool):
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def cuda_graph_factory() -> Callable[[], Graph]:
    """Makes CUDAGraphs that all allocate from one new pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda: CUDAGraph(pool)


class CUDAGraphRunner:
    """Captures `forward_logits` over decode-only batches, one graph per size in `capture_sizes`, and replays them.

    forward_logits(input_ids [bs] int64, positions [bs] int64, attn_meta) -> float32 logits [bs, vocab_size]: the
    model and its LM head over every row. backend.build_decode_metadata(slot_mapping, block_tables, seq_lens,
    block_size) builds attn_meta from device tensors only (no host work), so it is captured with the forward.
    graph_factory() -> Graph; None makes real CUDA graphs sharing one pool (tests pass a CPU stand-in).
    """

    def __init__(self, forward_logits: Callable[..., torch.Tensor], backend, *, capture_sizes: list[int],
                 max_num_blocks_per_seq: int, block_size: int, vocab_size: int, device: torch.device | str,
                 graph_factory: Callable[[], Graph] | None = None):
        if not capture_sizes or min(capture_sizes) < 1:
            raise ValueError(f"capture_sizes: must be a non-empty list of sizes >= 1, got {capture_sizes!r}")
        if max_num_blocks_per_seq < 1:
            raise ValueError(f"max_num_blocks_per_seq: must be >= 1, got {max_num_blocks_per_seq}")
        self.forward_logits = forward_logits
        self.backend = backend
        self.capture_sizes = sorted(set(capture_sizes))
        self.max_num_blocks_per_seq = max_num_blocks_per_seq
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.graph_factory = graph_factory
        self.graphs: dict[int, Graph] = {}  # bucket size -> graph, filled by capture()

        max_bs = self.capture_sizes[-1]
        width = _TABLE + max_num_blocks_per_seq
        # One row per sequence: id, position, slot, seq_len, the row to sample (in row i for the i-th sampled
        # sequence), then the block table. int32 holds them all (slots < 2**31 tokens of KV) at half int64's bytes.
        self.host_staging = torch.zeros(max_bs, width, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self.staging = torch.zeros(max_bs, width, dtype=torch.int32, device=self.device)
        # The static buffers the graphs read, in the dtypes the backend contract names.
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=self.device)
        self.block_tables = torch.zeros(max_bs, max_num_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=self.device)
        self.logits = torch.zeros(max_bs, vocab_size, dtype=torch.float32, device=self.device)

    @property
    def max_batch_size(self) -> int:
        return self.capture_sizes[-1]

    def bucket(self, num_seqs: int) -> int:
        """The smallest capture size >= num_seqs."""
        i = bisect.bisect_left(self.capture_sizes, num_seqs)
        if i == len(self.capture_sizes):
            raise ValueError(f"num_seqs: {num_seqs} is above the largest captured batch size {self.max_batch_size}")
        return self.capture_sizes[i]

    def _forward(self, bs: int) -> torch.Tensor:
        """The captured step: unpack the staged rows into the typed buffers, then the forward over bs rows."""
        rows = self.staging[:bs]
        self.input_ids[:bs].copy_(rows[:, _ID])
        self.positions[:bs].copy_(rows[:, _POS])
        self.slot_mapping[:bs].copy_(rows[:, _SLOT])
        self.seq_lens[:bs].copy_(rows[:, _LEN])
        self.block_tables[:bs].copy_(rows[:, _TABLE:])
        meta = self.backend.build_decode_metadata(self.slot_mapping[:bs], self.block_tables[:bs], self.seq_lens[:bs],
                                                  self.block_size)
        self.logits[:bs].copy_(self.forward_logits(self.input_ids[:bs], self.positions[:bs], meta))
        return self.logits[:bs]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, into one shared pool; logs the time and memory taken."""
        factory = self.graph_factory or cuda_graph_factory()
        on_cuda = self.device.type == "cuda"
        self._stage_padding(0, self.max_batch_size)
        self.staging.copy_(self.host_staging)
        if on_cuda:
            torch.cuda.synchronize(self.device)
            free_before, _ = torch.cuda.mem_get_info(self.device)
        start = time.perf_counter()
        for bs in reversed(self.capture_sizes):
            self._forward(bs)  # warm-up: lazy init and kernel compilation must not happen inside a capture
            graph = factory()
            graph.capture(lambda bs=bs: self._forward(bs))
            self.graphs[bs] = graph
        if on_cuda:
            torch.cuda.synchronize(self.device)
            free_after, _ = torch.cuda.mem_get_info(self.device)
            memory = f"{(free_before - free_after) / 1024**3:.2f} GiB"
        else:
            memory = "no device memory"
        log.info("CUDA graphs: captured %d decode batch sizes (%d..%d) in %.2f s, taking %s",
                 len(self.graphs), self.capture_sizes[0], self.max_batch_size, time.perf_counter() - start, memory)

    def supports(self, inp) -> bool:
        """True when `inp` (a ModelInput) is decode-only, fits a captured bucket, and every sequence's blocks fit
        a block-table row."""
        n = len(inp.spans)
        if not self.graphs or n == 0 or n > self.max_batch_size or inp.input_ids.numel() != n:
            return False
        return all(
            s.query_len == 1 and -(-(s.context_len + 1) // self.block_size) <= self.max_num_blocks_per_seq
            for s in inp.spans
        )

    def run(self, inp) -> torch.Tensor:
        """Replay the smallest bucket that holds `inp` (which `supports`); float32 logits [num_sampled, vocab].

        No host sync: one non-blocking copy in, one replay, one device-side row gather out.
        """
        n = len(inp.spans)
        bs = self.bucket(n)
        num_sampled = inp.logits_indices.numel()
        # The previous step's copy out of host_staging has finished before this write: the caller's sampler
        # copies each step's tokens to the host, which waits for everything queued before it.
        rows = self.host_staging[:bs].numpy()
        rows[:n, _ID] = inp.input_ids.numpy()
        rows[:n, _POS] = inp.positions.numpy()
        rows[:num_sampled, _SAMPLE] = inp.logits_indices.numpy()
        rows[num_sampled:bs, _SAMPLE] = 0
        rows[:n, _TABLE:] = 0
        bsz = self.block_size
        for i, s in enumerate(inp.spans):
            p = s.context_len  # the new token's position
            num_blocks = p // bsz + 1
            rows[i, _TABLE : _TABLE + num_blocks] = s.block_ids[:num_blocks]
            rows[i, _SLOT] = s.block_ids[p // bsz] * bsz + p % bsz
            rows[i, _LEN] = p + 1
        self._stage_padding(n, bs)
        self.staging[:bs].copy_(self.host_staging[:bs], non_blocking=True)
        self.graphs[bs].replay()
        return self.logits.index_select(0, self.staging[:num_sampled, _SAMPLE])

    def _stage_padding(self, start: int, end: int) -> None:
        rows = self.host_staging[start:end]
        rows.zero_()
        rows[:, _SLOT] = -1
