"""KV hand-off payload: what a prefill worker sends a decode worker for one request, one TP rank's shard."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVPayload:
    request_id: str
    model: str
    block_size: int
    dtype: str  # torch dtype name, e.g. "float32"
    tp_rank: int
    tp_size: int
    prompt_token_ids: list[int]
    # Tokens sampled on the prefill side (the first one); their KV is not in the payload yet.
    output_token_ids: list[int]
    # Tokens whose KV the payload holds: the prompt.
    num_computed_tokens: int
    num_cached_tokens: int
    # [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads (this rank's), head_dim]
    kv: torch.Tensor

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def check_compatible(self, *, model: str, block_size: int, dtype: str, tp_rank: int, tp_size: int,
                         num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ValueError naming the first field that does not match the importing engine."""
        for field_name, ours in (("model", model), ("block_size", block_size), ("dtype", dtype),
                                 ("tp_size", tp_size), ("tp_rank", tp_rank)):
            theirs = getattr(self, field_name)
            if theirs != ours:
                raise ValueError(f"{field_name}: KV payload has {theirs!r}, this engine has {ours!r}")
        expected = (num_layers, 2, None, block_size, num_kv_heads, head_dim)
        shape = tuple(self.kv.shape)
        if len(shape) != 6 or any(e is not None and e != s for e, s in zip(expected, shape)):
            raise ValueError(f"kv: payload shape {shape} does not fit [layers={num_layers}, 2, blocks, "
                             f"{block_size}, kv_heads={num_kv_heads}, head_dim={head_dim}]")
        need_blocks = -(-self.num_computed_tokens // block_size)
        if shape[2] != need_blocks:
            raise ValueError(f"kv: payload has {shape[2]} blocks for {self.num_computed_tokens} tokens, expected {need_blocks}")
