"""Model architecture config: one frozen record, built from a checkpoint's config.json or GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# config.json files without an `architectures` list still name their family in `model_type`.
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def check_architecture(architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architectures: {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style rope scaling (Llama 3.1+). `rope_type` "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None) -> "RopeScaling":
        """From config.json's `rope_parameters` (transformers 5) or `rope_scaling` (older; key `rope_type` or `type`)."""
        if not params:
            return cls()
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling: rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type == "default":
            return cls()
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise ValueError(f"rope_scaling: llama3 rope scaling needs {', '.join(missing)}")
        return cls(
            rope_type=rope_type,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Qwen2 puts a bias on q/k/v projections; Llama/Mistral do not.
    attention_bias: bool = False
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Name shown to users and carried in KV payloads (checkpoint folder or file name, or dummy arch name).
    name: str = ""

    def __post_init__(self):
        check_architecture(self.architecture)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_hf_config(
        cls, hf: dict[str, Any], name: str = "", generation: dict[str, Any] | None = None
    ) -> "ModelConfig":
        """From a Hugging Face config.json dict; `generation` (generation_config.json) adds its eos ids.

        Mistral's and Qwen2's sliding-window settings are ignored: the model attends to the full context.
        """
        model_type = hf.get("model_type")
        architecture = (hf.get("architectures") or [_ARCH_BY_MODEL_TYPE.get(model_type, str(model_type))])[0]
        check_architecture(architecture)
        # Qwen2 always has q/k/v bias (its config has no switch); Llama's `attention_bias` would also put a
        # bias on o_proj, which this engine's model does not have.
        attention_bias = architecture == "Qwen2ForCausalLM"
        for key in ("mlp_bias", "attention_bias"):
            if not attention_bias and hf.get(key):
                raise ValueError(f"{key}: biases are supported only on Qwen2's q/k/v projections")
        num_heads = _require(hf, "num_attention_heads")
        hidden_size = _require(hf, "hidden_size")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        generation = generation or {}
        bos_token_id = hf.get("bos_token_id")
        return cls(
            architecture=architecture,
            vocab_size=_require(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_require(hf, "intermediate_size"),
            num_hidden_layers=_require(hf, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_position_embeddings=_require(hf, "max_position_embeddings"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            rope_scaling=RopeScaling.from_hf(rope),
            bos_token_id=bos_token_id if bos_token_id is not None else generation.get("bos_token_id"),
            eos_token_ids=merge_token_ids(hf.get("eos_token_id"), generation.get("eos_token_id")),
            name=name,
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def merge_token_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    """Token ids from config fields that hold an int, a list or None; first occurrence kept, in order."""
    ids: list[int] = []
    for value in values:
        for token_id in [value] if isinstance(value, int) else value or []:
            if token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def _require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{key}: missing from the model's config.json")
    return hf[key]
