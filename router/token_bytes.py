"""Each token's own bytes, for logprobs: a token may hold part of a UTF-8 character, which no string can carry.

Decoding one token id alone gives U+FFFD for such a token (the first bytes of an emoji, say), so logprobs built
from `decode([id])` lose the bytes and collapse distinct tokens into one "\ufffd" key. `TokenBytes` reads the
bytes from the vocabulary instead:
  - byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2; the `ByteLevel` decoder): each character of a token stands for
    one byte, by GPT-2's bytes_to_unicode table;
  - SentencePiece with byte fallback (Llama 2, Mistral): `<0xE2>` is the byte 0xE2 and "▁" a space;
  - added and special tokens: their content, in UTF-8.
`token_str` renders bytes for JSON as OpenAI-compatible servers do for partial characters (DeepSeek, OpenAI):
valid UTF-8 as text, every other byte as a `\\xNN` escape, so distinct tokens keep distinct strings.
"""
from __future__ import annotations

import codecs
import json
import re

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the rest for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


class TokenBytes:
    """token id -> its bytes, for one tokenizer (a transformers tokenizer; its Rust backend when it has one).

    Built lazily per id and memoized: the whole vocabulary is never walked. Ids outside the vocabulary map to b"".
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        self._kind = "decode"
        self._added: dict[int, str] = {}
        # What decode(skip_special_tokens=True) leaves out.
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        if backend is not None:
            decoder = json.loads(backend.to_str()).get("decoder") or {}
            kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
            if "ByteLevel" in kinds:
                self._kind = "byte_level"
                self._byte_of = _byte_level_decoder()
            elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
                self._kind = "sentencepiece"
            added = backend.get_added_tokens_decoder()
            self._added = {i: t.content for i, t in added.items()}
            self._special.update(i for i, t in added.items() if t.special)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._lookup(token_id)
        return cached

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def _lookup(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        if self._kind == "decode":
            return self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._kind == "byte_level":
            byte_of = self._byte_of
            if all(c in byte_of for c in piece):
                return bytes(byte_of[c] for c in piece)
            return piece.encode("utf-8")
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match[1], 16)])
        return piece.replace("▁", " ").encode("utf-8")


def token_str(data: bytes) -> str:
    """A token's bytes as a JSON-safe string: valid UTF-8 as text, other bytes as `\\xNN` escapes."""
    return data.decode("utf-8", errors="backslashreplace")


class TextOffsets:
    """Completions' `text_offset`: where each token's text starts in the returned text, in characters.

    Counts the characters that the tokens' bytes complete (a token holding the first bytes of a character starts
    where that character will), leaving out special tokens when they are skipped, as the detokenizer does.
    """

    def __init__(self, token_bytes: TokenBytes, skip_special_tokens: bool):
        self._token_bytes = token_bytes
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.num_chars = 0

    def add(self, token_id: int) -> int:
        """The offset of `token_id`, the next token; then counts its text."""
        offset = self.num_chars
        if not (self._skip_special and self._token_bytes.is_special(token_id)):
            self.num_chars += len(self._utf8.decode(self._token_bytes(token_id)))
        return offset
