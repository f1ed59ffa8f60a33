"""Runs the model on one tensor-parallel rank: owns the weights, the KV cache tensors and the attention backend.

The driver (rank 0) turns a SchedulerOutput into a ModelInput; every rank runs the same ModelInput, so the
collectives inside the layers line up. Only the driver samples.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil
import torch

from workers.config import EngineConfig
from workers.cpu_tuning import tune_glibc_malloc
from workers.model.backends import make_attention_backend
from workers.model.backends.base import SeqSpan, to_device
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.loader import ModelSource, iter_weights
from workers.parallel import TPGroup
from workers.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True)
class ModelInput:
    """What every rank needs for one forward pass; sent from the driver to the other ranks."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    spans: list[SeqSpan]  # in the order of input_ids
    # Rows of the output whose next token is sampled: the last new token of each sequence that completes.
    logits_indices: torch.Tensor  # [num_sampled]


def build_model_input(out: SchedulerOutput, kv_block_ids) -> ModelInput:
    input_ids, positions, spans, logits_indices = [], [], [], []
    offset = 0
    for seq in out.seqs:
        req = seq.request
        end = seq.context_len + seq.num_new_tokens
        input_ids.extend(req.all_token_ids[seq.context_len : end])
        positions.extend(range(seq.context_len, end))
        spans.append(SeqSpan(seq.context_len, seq.num_new_tokens, kv_block_ids(req.req_id)))
        offset += seq.num_new_tokens
        if seq.samples:
            logits_indices.append(offset - 1)
    return ModelInput(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        spans=spans,
        logits_indices=torch.tensor(logits_indices, dtype=torch.long),
    )


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, source: ModelSource, tp: TPGroup, max_model_len: int):
        self.config = config
        self.model_config = model_config
        self.tp = tp
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and tp.size > 1:
            # One device per rank: cuda:rank when the ranks share a process tree that sees every device (the
            # offline engine's spawned ranks), cuda:0 when each sees only its own (Ray actors, one GPU each).
            index = tp.rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", index)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            tune_glibc_malloc()
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.backend = make_attention_backend(config.attention_backend, self.device)
        self.graph_runner = None  # set by capture_cuda_graphs

        torch.manual_seed(config.seed)
        with torch.device(self.device):
            model = LlamaForCausalLM(model_config, tp, max_model_len)
        if source.kind == "dummy":
            model.init_dummy_weights(config.seed)
        else:
            model.load_weights(iter_weights(source, model_config))
        self.model = model.to(self.dtype).eval()
        self.model.requires_grad_(False)
        if self.device.type == "cpu":
            self.model.lm_head.keep_transposed_copy()
        self.num_blocks = 0  # set by allocate_kv_cache once all ranks agree on a count

    @property
    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return c.num_hidden_layers * 2 * self.block_size * self.model.num_kv_heads * c.head_dim * elem

    def available_kv_blocks(self) -> int:
        """Blocks that fit this rank's KV budget; ranks take the minimum over the group."""
        cache = self.config.cache
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for activations and logits of a full step.
            reserve = 2 * 1024**3
            budget = int(total * cache.gpu_memory_utilization) - (total - free) - reserve
        else:
            budget = int(psutil.virtual_memory().available * cache.cpu_kv_cache_fraction)
        num_blocks = budget // self.kv_bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes: budget of {budget} bytes holds no block of {self.kv_bytes_per_block} bytes"
            )
        return int(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_config
        self.num_blocks = num_blocks
        # [num_layers, 2 (k, v), num_blocks * block_size, num_kv_heads, head_dim]; torch.empty leaves untouched
        # pages unbacked on CPU, so a large budget costs memory only as blocks are used.
        self.kv_cache = torch.empty(
            c.num_hidden_layers, 2, self.num_blocks * self.block_size, self.model.num_kv_heads, c.head_dim,
            dtype=self.dtype, device=self.device,
        )
        # Attention reads whole blocks, masking slots past each sequence's end; those must be finite, so blocks
        # are zeroed before their first use. The pool hands out never-used blocks in id order, so one
        # high-water mark tracks them and the cache stays lazily backed until used.
        self._num_zeroed_blocks = 0
        self.layer_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(c.num_hidden_layers)]
        log.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB) on %s, rank %d/%d",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size,
            self.num_blocks * self.kv_bytes_per_block / 1024**3, self.device, self.tp.rank, self.tp.size,
        )

    def _zero_blocks_through(self, block_id: int) -> None:
        if block_id < self._num_zeroed_blocks:
            return
        end = min(self.num_blocks, max(block_id + 1, self._num_zeroed_blocks + 64))
        bs = self.block_size
        self.kv_cache[:, :, self._num_zeroed_blocks * bs : end * bs].zero_()
        self._num_zeroed_blocks = end

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Capture decode-only steps as CUDA graphs (workers/model/cuda_graph.py); after allocate_kv_cache.

        A no-op on CPU and with enforce_eager. With TP > 1 every rank captures the same buckets in the same
        order, so the collectives inside the graphs line up.
        """
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        from workers.model.cuda_graph import CUDAGraphRunner, default_capture_sizes

        sizes = self.config.cudagraph_capture_sizes or default_capture_sizes(self.config.scheduler.max_num_seqs)

        def forward_logits(input_ids, positions, attn_meta):
            hidden = self.model(input_ids, positions, self.layer_caches, self.backend, attn_meta)
            return self.model.compute_logits(hidden).float()

        self.graph_runner = CUDAGraphRunner(
            forward_logits, self.backend, capture_sizes=list(sizes),
            max_num_blocks_per_seq=-(-self.max_model_len // self.block_size), block_size=self.block_size,
            vocab_size=self.model_config.vocab_size, device=self.device,
        )
        self.graph_runner.capture()

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> torch.Tensor | None:
        """One forward pass over the step's tokens; returns float32 logits [num_sampled, vocab] or None.

        Decode-only steps that fit a captured bucket replay a CUDA graph; the rest run eagerly.
        """
        self._zero_blocks_through(max(max(s.block_ids) for s in inp.spans))
        if self.graph_runner is not None and inp.logits_indices.numel() and self.graph_runner.supports(inp):
            return self.graph_runner.run(inp)
        meta = self.backend.build_metadata(inp.spans, self.block_size, self.device)
        input_ids = to_device(inp.input_ids, self.device)
        positions = to_device(inp.positions, self.device)
        hidden = self.model(input_ids, positions, self.layer_caches, self.backend, meta)
        if inp.logits_indices.numel() == 0:
            return None
        hidden = hidden.index_select(0, to_device(inp.logits_indices, self.device))
        return self.model.compute_logits(hidden).float()

    # --- KV hand-off: this rank's shard of whole blocks --------------------------------------------------

    def _block_view(self) -> torch.Tensor:
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        c = self.model_config
        return self.kv_cache.view(c.num_hidden_layers, 2, self.num_blocks, self.block_size, self.model.num_kv_heads, c.head_dim)

    @torch.inference_mode()
    def export_blocks(self, block_ids: list[int], on_device: bool = False) -> torch.Tensor:
        """[num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim] in host memory (pinned on CUDA), or
        with `on_device` a new tensor on the engine's device (for a transport that moves device memory: cuda_ipc).

        The other transports (tcp, shm, the Redis tier) move host memory; from a GPU the blocks are gathered on the
        device and copied once into a pinned buffer, at the full PCIe rate instead of pageable memory's.
        """
        idx = to_device(torch.tensor(block_ids, dtype=torch.long), self.device)
        blocks = self._block_view().index_select(2, idx)
        if self.device.type != "cuda" or on_device:
            return blocks
        host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
        host.copy_(blocks, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()  # the caller reads host right away; an event wait, so the sync debug mode stays quiet
        return host

    @torch.inference_mode()
    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """data: [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim], any device and dtype."""
        self._zero_blocks_through(max(block_ids))
        idx = to_device(torch.tensor(block_ids, dtype=torch.long), self.device)
        if self.device.type == "cuda" and data.device.type == "cpu":
            data = data if data.is_pinned() else data.pin_memory()
        self._block_view().index_copy_(2, idx, data.to(self.device, self.dtype, non_blocking=True))
