"""The router's side of the model: tokenizing prompts and the fast decoder streamed text is built with."""
from __future__ import annotations

import random

import pytest

from router.model import ServedModel
from workers.detokenizer import IncrementalDetokenizer
from workers.sampling_params import SamplingParams


def test_served_model_matches_the_workers_name_and_vocab(served_model):
    assert served_model.name == "SmolLM2-135M-Instruct.Q4_1"
    assert served_model.vocab_size == 49152


def test_fast_decoder_gives_transformers_text(served_model):
    tok, fast = served_model.tokenizer, served_model.decoder
    rng = random.Random(0)
    special = [tok.eos_token_id, tok.bos_token_id]
    for _ in range(50):
        ids = [rng.randrange(served_model.vocab_size) for _ in range(rng.randrange(1, 12))] + special
        rng.shuffle(ids)
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == tok.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def test_streamed_text_equals_the_whole_decode(served_model):
    text = " Héllo wörld — 你好, emojis 🎉🎉 and numbers 12345."
    ids = served_model.tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(served_model.decoder, [1, 2, 3], SamplingParams())
    deltas = []
    for t in ids:
        detok.update([t])
        deltas.append(detok.get_next_text_delta())
    deltas.append(detok.get_next_text_delta(finished=True))
    assert "".join(deltas) == text


def test_chat_without_messages_is_an_input_error(served_model):
    with pytest.raises(ValueError, match="^input:"):
        served_model.encode_chat([])


def test_dummy_model_has_no_tokenizer():
    from workers.model.loader import DUMMY_ARCHS
    if not DUMMY_ARCHS:
        pytest.skip("no dummy architectures shipped")
    model = ServedModel.load(DUMMY_ARCHS[0], "dummy")
    assert model.tokenizer is None and model.vocab_size > 0 and model.name == DUMMY_ARCHS[0]
    with pytest.raises(ValueError, match="^input: .* has no tokenizer"):
        model.encode_text("hi")
