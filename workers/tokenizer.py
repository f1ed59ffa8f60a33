"""Load a model's tokenizer from local files only: a GGUF's embedded vocabulary or a checkpoint folder's files."""
from __future__ import annotations

import inspect
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


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True, *,
                continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
                content_special_tokens: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template (callers check it has one).

    Options as vLLM's chat API names them: `add_generation_prompt` opens the assistant's turn;
    `continue_final_message` leaves the last (assistant) message open so the model continues its text (no
    end-of-turn after it; exclusive with add_generation_prompt); `chat_template_kwargs` are extra template
    variables (e.g. enable_thinking). Message content is text: control markers in it (`<|im_end|>`) become
    ordinary tokens, so a user cannot open a turn of another role. `content_special_tokens=True` restores the
    raw behaviour (content tokenized like the template's own text). Raises ValueError naming the option.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message: cannot be combined with add_generation_prompt: true")
    if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
        raise ValueError("continue_final_message: the last message must have role 'assistant'")
    kwargs = dict(chat_template_kwargs or {})
    # Only template variables: apply_chat_template's own parameters (chat_template, tools, tokenize, ...) would
    # let a client swap the template or change what comes back.
    reserved = sorted(kwargs.keys() & (set(inspect.signature(tokenizer.apply_chat_template).parameters) | {"messages"}))
    if reserved:
        raise ValueError(f"chat_template_kwargs: {reserved[0]!r} is not a template variable that may be set")
    # transformers' sanitize_control_tokens encodes control tokens found in the messages (and template variables)
    # as ordinary text; only those the template writes itself become control tokens. The template writes any BOS.
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, sanitize_control_tokens=not content_special_tokens, **kwargs)
