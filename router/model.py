"""The served model as the router sees it: its name, tokenizer and vocabulary size. No weights are loaded."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from router.token_bytes import TokenBytes
from workers.model.loader import load_model_config, resolve_model
from workers.tokenizer import encode_chat, load_tokenizer


@dataclass(frozen=True)
class ServedModel:
    # What clients may name in `model`, and what workers report in WorkerInfo.model.
    name: str
    # None for dummy models: only token-id prompts are accepted and no text is produced.
    tokenizer: object | None
    vocab_size: int
    # Raw chat content: control markers in message content become control tokens (router config
    # chat_content_special_tokens). Off by default: content is text.
    content_special_tokens: bool = False

    @classmethod
    def load(cls, model: str | None, load_format: str = "auto", content_special_tokens: bool = False) -> "ServedModel":
        """Resolve `model` as workers do and load its tokenizer (a few seconds for a GGUF)."""
        source = resolve_model(model, load_format)
        tokenizer = load_tokenizer(source)
        if tokenizer is not None and source.gguf_file is not None:
            # A GGUF's tokenizer is built from its own token list, which sizes its embedding; reading the GGUF's
            # config instead would parse every tensor header (~2 s).
            vocab_size = len(tokenizer)
        else:
            vocab_size = load_model_config(source).vocab_size
        return cls(name=source.name, tokenizer=tokenizer, vocab_size=vocab_size,
                   content_special_tokens=content_special_tokens)

    @cached_property
    def decoder(self):
        """What IncrementalDetokenizer decodes with: the Rust tokenizer itself when there is one, which is ~5x
        cheaper a call than transformers' wrapper (the router decodes twice per streamed token)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return self.tokenizer if backend is None else _RustDecoder(backend)

    @cached_property
    def token_bytes(self) -> TokenBytes | None:
        """Each token id's own bytes, for logprobs (router/token_bytes.py); None without a tokenizer."""
        return TokenBytes(self.tokenizer) if self.tokenizer is not None else None

    def encode_text(self, text: str) -> list[int]:
        """Raises ValueError naming `input` for a model without a tokenizer."""
        return self._require_tokenizer().encode(text, add_special_tokens=True)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[int]:
        """Render with the chat template, as workers.llm.LLM.apply_chat_template does (workers.tokenizer.encode_chat
        documents the options); ValueError naming the field otherwise."""
        tok = self._require_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"input: model {self.name!r} has no chat template; send text or token_ids")
        if not messages:
            raise ValueError("input: chat has no messages")
        return encode_chat(tok, messages, add_generation_prompt, continue_final_message=continue_final_message,
                           chat_template_kwargs=chat_template_kwargs,
                           content_special_tokens=self.content_special_tokens)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"input: model {self.name!r} has no tokenizer; send token_ids")
        return self.tokenizer


class _RustDecoder:
    """tokenizers.Tokenizer.decode behind the PreTrainedTokenizer.decode signature IncrementalDetokenizer calls.

    Same text as transformers' fast tokenizers with clean_up_tokenization_spaces=False, which is all the
    detokenizer ever asks for.
    """

    def __init__(self, backend):
        self._decode = backend.decode

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = False) -> str:
        assert not clean_up_tokenization_spaces
        return self._decode(token_ids, skip_special_tokens=skip_special_tokens)
