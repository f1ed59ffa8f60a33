"""Load a model's tokenizer from local files only: a GGUF's embedded vocabulary or a checkpoint folder's files."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from workers.model.loader import ModelSource

# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase | None:
    """The tokenizer of `source`, never fetched from the network; None for dummy models (token-id prompts only).

    Building a GGUF's tokenizer converts its whole vocabulary and takes a few seconds.
    """
    if source.kind == "dummy":
        return None
    if source.gguf_file is not None:
        return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file.name, local_files_only=True)
    if not has_tokenizer_files(source.path):
        raise ValueError(
            f"model: {str(source.path)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "save one there with tokenizer.save_pretrained(folder)"
        )
    return AutoTokenizer.from_pretrained(source.path, local_files_only=True)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template (callers check it has one)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes any BOS itself.
    return tokenizer.encode(text, add_special_tokens=False)
