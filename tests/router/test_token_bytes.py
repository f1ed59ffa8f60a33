"""Token bytes from the default model's vocabulary (byte-level BPE): each token's own bytes, strings that keep
distinct tokens distinct, and text offsets that count the characters the bytes complete."""
from __future__ import annotations

import pytest

from router.token_bytes import TextOffsets, TokenBytes, token_str

TEXTS = ["Hello, world!", "🚀 launch 🌟", "你好，世界", "café — “quotes”", " 6, 7, 8", "a\n\tb  c"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_the_text(served_model, text):
    tokenizer = served_model.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    token_bytes = served_model.token_bytes
    assert b"".join(token_bytes(i) for i in ids) == text.encode("utf-8")
    # Whole-character tokens render as their text; partial ones as escapes, never U+FFFD.
    for i in ids:
        s = token_str(token_bytes(i))
        assert "\ufffd" not in s
        decoded = tokenizer.decode([i])
        assert s == decoded if "\ufffd" not in decoded else s.startswith(decoded.split("\ufffd")[0])


def test_partial_character_tokens_are_escaped(served_model):
    ids = served_model.tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1
    assert [token_str(served_model.token_bytes(i)) for i in ids] == ["\\xf0\\x9f", "\\x9a", "\\x80"]


def test_special_tokens_are_their_content(served_model):
    token_bytes = served_model.token_bytes
    eos = served_model.tokenizer.eos_token_id
    assert token_bytes(eos) == b"<|im_end|>" and token_bytes.is_special(eos)
    assert not token_bytes.is_special(served_model.tokenizer.encode("a", add_special_tokens=False)[0])


def test_every_vocabulary_entry_is_distinct(served_model):
    strings = {token_str(served_model.token_bytes(i)) for i in range(served_model.vocab_size)}
    assert len(strings) == served_model.vocab_size


@pytest.mark.parametrize("skip_special", [True, False])
def test_text_offsets_start_each_token_at_its_character(served_model, skip_special):
    tokenizer = served_model.tokenizer
    ids = tokenizer.encode("ab🚀c", add_special_tokens=False) + [tokenizer.eos_token_id]
    offsets = TextOffsets(served_model.token_bytes, skip_special)
    got = [offsets.add(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=skip_special)
    # "ab" then the three tokens of the rocket all start at 2, "c" at 3, EOS after it.
    assert got[-2:] == [3, 4] and got[:-2] == sorted(got[:-2]) and got.count(2) >= 3
    assert offsets.num_chars == len(text)


def test_tokenizer_without_backend_falls_back_to_decode(served_model):
    class SlowTokenizer:  # a tokenizer with no Rust backend, like transformers' slow ones
        all_special_ids = ()

        def decode(self, ids, skip_special_tokens=False):
            return served_model.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    token_bytes = TokenBytes(SlowTokenizer())
    a = served_model.tokenizer.encode(" hello", add_special_tokens=False)[0]
    assert token_bytes(a) == b" hello"
