"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in plain PyTorch, over a flat ragged batch.

Every forward call takes all tokens of a step at once, [num_tokens], with their positions; attention reads
and writes the paged KV cache through the backend's per-step metadata. There is no per-sequence loop here.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.config import ModelConfig
from workers.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from workers.parallel import TPGroup, shard_range


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, rope: RotaryEmbedding):
        super().__init__()
        shard_range(config.num_attention_heads, tp.rank, tp.size, "num_attention_heads")
        shard_range(config.num_key_value_heads, tp.rank, tp.size, "num_key_value_heads")
        self.num_heads = config.num_attention_heads // tp.size
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.head_dim = config.head_dim
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [config.q_size, config.kv_size, config.kv_size], config.attention_bias, tp,
            ["q_proj", "k_proj", "v_proj"],
        )
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, tp, "o_proj")
        self.rope = rope

    def forward(self, positions, hidden, k_cache, v_cache, backend, attn_meta):
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope(positions, q, k)
        out = backend.forward(q, k, v, k_cache, v_cache, attn_meta)
        return self.o_proj(out.reshape(-1, q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, False, tp, ["gate_proj", "up_proj"]
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, tp, "down_proj")

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(config, tp, rope)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, k_cache, v_cache, backend, attn_meta):
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), k_cache, v_cache, backend, attn_meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


_LAYER_PARAM = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)")


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup, max_positions: int):
        super().__init__()
        self.config = config
        self.tp = tp
        rope = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, tp, rope) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads // self.tp.size

    def forward(self, input_ids, positions, kv_caches, backend, attn_meta) -> torch.Tensor:
        """input_ids, positions: [num_tokens]; returns final hidden states [num_tokens, hidden_size]."""
        hidden = self.embed_tokens(input_ids)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, k_cache, v_cache, backend, attn_meta)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full (unsharded) tensors named as in Hugging Face checkpoints; keep this rank's shard."""
        loaded = set()
        for name, tensor in weights:
            if name == "model.embed_tokens.weight":
                self.embed_tokens.load_full(tensor)
            elif name == "lm_head.weight":
                if not self.config.tie_word_embeddings:
                    self.lm_head.load_full(tensor)
            elif name == "model.norm.weight":
                self.norm.weight.data.copy_(tensor)
            elif m := re.fullmatch(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", name):
                getattr(self.layers[int(m[1])], m[2]).weight.data.copy_(tensor)
            elif m := _LAYER_PARAM.fullmatch(name):
                layer = self.layers[int(m[1])]
                proj, kind = m[3] + "_proj", m[4]
                if proj in ("o_proj", "down_proj"):
                    getattr(layer.self_attn if proj == "o_proj" else layer.mlp, proj).load_full(tensor)
                elif proj in ("q_proj", "k_proj", "v_proj"):
                    layer.self_attn.qkv_proj.load_part(proj, kind, tensor)
                else:
                    layer.mlp.gate_up_proj.load_part(proj, kind, tensor)
            elif name.endswith("rotary_emb.inv_freq"):
                continue
            else:
                raise ValueError(f"checkpoint: unexpected parameter {name!r}")
            loaded.add(name)
        missing = {n for n in self.expected_weight_names()} - loaded
        if missing:
            raise ValueError(f"checkpoint: missing parameters, e.g. {sorted(missing)[:3]}")

    def expected_weight_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.config.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
            if self.config.attention_bias:
                names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        return names

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Random weights for speed tests of named architectures (load_format='dummy')."""
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
