import json

import pytest
import torch

from workers.model.config import RopeScaling
from workers.model.loader import (
    DUMMY_ARCHS,
    ModelSource,
    iter_weights,
    load_model_config,
    resolve_model,
)
from workers.tokenizer import load_tokenizer


def assert_weights_equal_hf(source: ModelSource, hf_model) -> None:
    config = load_model_config(source)
    reference = hf_model.state_dict()
    names = []
    for name, tensor in iter_weights(source, config):
        names.append(name)
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), f"{name}: max diff {(tensor - reference[name]).abs().max()}"
    expected = set(reference) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert len(names) == len(set(names)) and set(names) == expected


def llama_config_json() -> dict:
    """An older-style (rope_theta at top level) Llama 3 config.json."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "bos_token_id": 128000,
    }


# --- the default GGUF ----------------------------------------------------------------------------------


def test_default_model_resolves_to_the_smollm2_gguf(default_model_path):
    source = resolve_model(None)
    assert source.kind == "gguf" and source.gguf_file == default_model_path
    assert source.name == "SmolLM2-135M-Instruct.Q4_1"
    # A folder holding just that one .gguf resolves to the same file.
    assert resolve_model(str(default_model_path.parent)).gguf_file == default_model_path


def test_default_gguf_config_matches_hf(hf_default_model):
    config = load_model_config(resolve_model(None))
    hf = hf_default_model.config
    assert config.architecture == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (576, 30, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "rms_norm_eps", "tie_word_embeddings", "bos_token_id"):
        assert getattr(config, field) == getattr(hf, field), field
    assert config.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert config.rope_scaling == RopeScaling()
    assert config.tie_word_embeddings and not config.attention_bias
    assert config.eos_token_ids == (hf.eos_token_id,) == (2,)


def test_gguf_weights_equal_hf_state_dict(hf_default_model):
    """Dequantized and un-permuted (q/k rope order) GGUF tensors match transformers' own GGUF load exactly."""
    assert_weights_equal_hf(resolve_model(None), hf_default_model)


# --- safetensors checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_safetensors_weights_equal_hf_state_dict(tiny_checkpoint, arch):
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(arch)
    source = resolve_model(str(folder))
    assert source.kind == "safetensors" and source.name == folder.name
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert_weights_equal_hf(source, hf_model)


def test_sharded_llama_checkpoint_is_read_through_its_index(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    source = resolve_model(str(folder), "safetensors")
    names = {name for name, _ in iter_weights(source, load_model_config(source))}
    assert names == set(weight_map)


def test_llama_config_reads_llama3_rope_scaling(tiny_checkpoint):
    config = load_model_config(resolve_model(str(tiny_checkpoint("llama"))))
    assert config.architecture == "LlamaForCausalLM"
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 256)
    assert config.rope_theta == 10000.0
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (64, 4, 2, 16)
    assert not config.tie_word_embeddings and not config.attention_bias
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1


def test_qwen2_config_has_attention_bias(tiny_checkpoint):
    config = load_model_config(resolve_model(str(tiny_checkpoint("qwen2"))))
    assert config.architecture == "Qwen2ForCausalLM" and config.attention_bias


def test_mistral_config_parses(tiny_checkpoint):
    config = load_model_config(resolve_model(str(tiny_checkpoint("mistral"))))
    assert config.architecture == "MistralForCausalLM"
    assert config.rope_scaling.rope_type == "default" and config.max_position_embeddings == 2048


def test_legacy_rope_scaling_and_generation_config_eos(tmp_path):
    """Pre-transformers-5 config.json (rope_theta + rope_scaling with `type`); generation_config adds eos ids."""
    hf = llama_config_json()
    hf["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}
    hf["eos_token_id"] = [128001, 128008]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128008, 128009]}))
    config = load_model_config(resolve_model(str(tmp_path), "dummy"))
    assert config.rope_theta == 500000.0 and config.rope_scaling.rope_type == "llama3"
    assert config.eos_token_ids == (128001, 128008, 128009)


# --- dummy architectures -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", DUMMY_ARCHS)
def test_dummy_arch_resolves_and_has_a_config(arch):
    source = resolve_model(arch, "dummy")
    assert source.kind == "dummy" and source.dummy_arch == arch and source.name == arch
    config = load_model_config(source)
    assert config.name == arch and config.head_dim * config.num_attention_heads == config.hidden_size
    assert list(iter_weights(source, config)) == []
    assert load_tokenizer(source) is None


def test_shipped_dummy_archs_have_published_shapes():
    assert {"llama-3-8b", "llama-3-70b", "llama-3.1-8b", "qwen2-7b", "mistral-7b"} <= set(DUMMY_ARCHS)
    configs = {arch: load_model_config(resolve_model(arch, "dummy")) for arch in DUMMY_ARCHS}
    l8, l70, l31, q7 = configs["llama-3-8b"], configs["llama-3-70b"], configs["llama-3.1-8b"], configs["qwen2-7b"]
    assert (l8.hidden_size, l8.intermediate_size, l8.num_hidden_layers, l8.num_key_value_heads) == (4096, 14336, 32, 8)
    assert (l8.vocab_size, l8.rope_theta, l8.tie_word_embeddings) == (128256, 500000.0, False)
    assert (l70.hidden_size, l70.intermediate_size, l70.num_hidden_layers, l70.num_attention_heads) == (8192, 28672, 80, 64)
    assert l31.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192) and l31.max_position_embeddings == 131072
    assert (q7.hidden_size, q7.num_key_value_heads, q7.vocab_size, q7.rms_norm_eps) == (3584, 4, 152064, 1e-6)
    assert q7.attention_bias and q7.architecture == "Qwen2ForCausalLM"
    assert configs["mistral-7b"].architecture == "MistralForCausalLM"


def test_dummy_folder_takes_its_config_json(tiny_checkpoint):
    source = resolve_model(str(tiny_checkpoint("qwen2")), "dummy")
    assert source.kind == "dummy" and source.dummy_arch is None
    assert load_model_config(source).hidden_size == 64


# --- errors --------------------------------------------------------------------------------------------


def test_missing_model_path_names_the_field():
    with pytest.raises(ValueError, match=r"model: '/no/such/model' does not exist.*llama-3-8b"):
        resolve_model("/no/such/model")


def test_dummy_name_without_dummy_load_format_says_how():
    with pytest.raises(ValueError, match=r"model: 'llama-3-8b' is a dummy architecture.*load_format='dummy'"):
        resolve_model("llama-3-8b")


def test_bad_load_format_lists_allowed_values():
    with pytest.raises(ValueError, match=r"load_format: must be one of auto, safetensors, gguf, dummy, got 'pt'"):
        resolve_model(None, "pt")


def test_gguf_file_with_safetensors_load_format_is_refused(default_model_path):
    with pytest.raises(ValueError, match="load_format: 'safetensors' needs a folder"):
        resolve_model(str(default_model_path), "safetensors")


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"model: .* holds no \.gguf file and no safetensors checkpoint"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_names_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 768}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    source = resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"architectures: 'GPT2LMHeadModel' is not supported; supported: .*LlamaForCausalLM"):
        load_model_config(source)


def test_unsupported_rope_type_names_rope_scaling(tmp_path):
    hf = llama_config_json()
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"rope_scaling: rope_type 'yarn' is not supported"):
        load_model_config(resolve_model(str(tmp_path), "dummy"))


# --- tokenizer -----------------------------------------------------------------------------------------


def test_gguf_tokenizer_loads_offline_and_matches_hf(hf_default_tokenizer):
    tokenizer = load_tokenizer(resolve_model(None))
    assert tokenizer.encode("Hello") == hf_default_tokenizer.encode("Hello") == [19556]
    text = "The capital of France is"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_id in load_model_config(resolve_model(None)).eos_token_ids


def test_checkpoint_folder_tokenizer_loads(tiny_checkpoint, hf_default_tokenizer):
    tokenizer = load_tokenizer(resolve_model(str(tiny_checkpoint("mistral"))))
    assert tokenizer.encode("Hello world") == hf_default_tokenizer.encode("Hello world")


def test_folder_without_tokenizer_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model: .* has no tokenizer files"):
        load_tokenizer(resolve_model(str(tmp_path)))
