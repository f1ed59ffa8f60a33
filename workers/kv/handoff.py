"""KV hand-off payload: what a prefill worker sends a decode worker for one request, one TP rank's shard."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The kv tensor's dimensions, in order; a payload with another layout is refused, not misread.
KV_LAYOUT = "tandem.kv.v1:layers,kv,blocks,block_size,kv_heads,head_dim"


@dataclass(frozen=True)
class KVPayload:
    request_id: str
    model: str
    block_size: int
    dtype: str  # torch dtype name, e.g. "float32"
    tp_rank: int
    tp_size: int
    # The model's KV heads, all ranks together: this shard holds heads [tp_rank * n, (tp_rank + 1) * n) with
    # n = num_kv_heads_total / tp_size, so an engine of another TP size can check and regroup the set (reshard.py).
    num_kv_heads_total: int
    prompt_token_ids: list[int]
    # Tokens sampled on the prefill side (the first one); their KV is not in the payload yet.
    output_token_ids: list[int]
    # Tokens whose KV the payload holds: the prompt.
    num_computed_tokens: int
    num_cached_tokens: int
    # [num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads (this rank's), head_dim]
    kv: torch.Tensor
    layout: str = KV_LAYOUT

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def check_compatible(self, *, model: str, block_size: int, dtype: str, num_layers: int, num_kv_heads_total: int,
                         head_dim: int) -> None:
        """Raise ValueError naming the first field that does not match the importing engine. The source TP size
        may differ from the engine's: any that divides the model's KV heads can be resharded."""
        if self.layout != KV_LAYOUT:
            raise ValueError(f"layout: KV payload has {self.layout!r}, this engine reads {KV_LAYOUT!r}")
        for field_name, ours in (("model", model), ("block_size", block_size), ("dtype", dtype),
                                 ("num_kv_heads_total", num_kv_heads_total)):
            theirs = getattr(self, field_name)
            if theirs != ours:
                raise ValueError(f"{field_name}: KV payload has {theirs!r}, this engine has {ours!r}")
        if self.tp_size < 1 or num_kv_heads_total % self.tp_size:
            raise ValueError(f"tp_size: KV payload has {self.tp_size}, which does not divide "
                             f"num_kv_heads_total={num_kv_heads_total}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank: KV payload has {self.tp_rank}, outside tp_size={self.tp_size}")
        num_kv_heads = num_kv_heads_total // self.tp_size
        expected = (num_layers, 2, None, block_size, num_kv_heads, head_dim)
        shape = tuple(self.kv.shape)
        if len(shape) != 6 or any(e is not None and e != s for e, s in zip(expected, shape)):
            raise ValueError(f"kv: payload shape {shape} does not fit [layers={num_layers}, 2, blocks, "
                             f"{block_size}, kv_heads={num_kv_heads}, head_dim={head_dim}]")
        need_blocks = -(-self.num_computed_tokens // block_size)
        if shape[2] != need_blocks:
            raise ValueError(f"kv: payload has {shape[2]} blocks for {self.num_computed_tokens} tokens, expected {need_blocks}")
