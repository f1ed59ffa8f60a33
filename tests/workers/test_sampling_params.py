import dataclasses

import pytest

from workers.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.is_greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 2}, "n: only n=1"),
        ({"temperature": -1.0}, "temperature: must be >= 0, got -1.0"),
        ({"temperature": float("nan")}, "temperature: must be >= 0"),
        ({"temperature": float("inf")}, "temperature: must be finite, got inf"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty: must be finite"),
        ({"logit_bias": {5: 100.5}}, "logit_bias[5]: must be a number in [-100, 100]"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias[5]: must be a number in [-100, 100]"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias: token ids must be ints >= 0"),
        ({"logit_bias": [(5, 1.0)]}, "logit_bias: must be a dict"),
        ({"top_p": 0.0}, "top_p: must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"top_k": -2}, "top_k: must be -1, 0 (disabled) or >= 1, got -2"),
        ({"min_p": 1.5}, "min_p: must be in [0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty: must be > 0"),
        ({"presence_penalty": 2.5}, "presence_penalty: must be in [-2, 2]"),
        ({"frequency_penalty": -3.0}, "frequency_penalty: must be in [-2, 2]"),
        ({"max_tokens": 0}, "max_tokens: must be >= 1, got 0"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens: must be in [0, max_tokens=4], got 5"),
        ({"min_tokens": -1}, "min_tokens: must be in [0, max_tokens"),
        ({"logprobs": -1}, "logprobs: must be in [0, 20]"),
        ({"logprobs": 21}, "logprobs: must be in [0, 20]"),
        ({"stop": ["ok", ""]}, "stop: must be non-empty"),
        ({"stop_token_ids": [-1]}, "stop_token_ids: must be ints >= 0"),
        ({"seed": "42"}, "seed: must be an int"),
        ({"seed": 1.5}, "seed: must be an int"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_normalization():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[7, 8])
    assert p.top_k == 0
    assert p.stop == ("###",)
    assert p.stop_token_ids == (7, 8)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=["a", "bcd"]).max_stop_str_len == 3


def test_greedy_threshold():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy


def test_max_tokens_none_allows_any_min_tokens():
    p = SamplingParams(max_tokens=None, min_tokens=1000)
    assert p.max_tokens is None and p.min_tokens == 1000


def test_replace_revalidates_and_keeps_normalization():
    p = SamplingParams(stop="x", max_tokens=8)
    q = dataclasses.replace(p, max_tokens=4)
    assert q.max_tokens == 4 and q.stop == ("x",) and p.max_tokens == 8
    with pytest.raises(ValueError, match="max_tokens"):
        dataclasses.replace(p, max_tokens=0)


def test_params_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5


def test_logit_bias_is_a_read_only_copy_and_leaves_params_hashable():
    bias = {5: 1.5}
    p = SamplingParams(logit_bias=bias)
    bias[6] = 2.0
    assert dict(p.logit_bias) == {5: 1.5}
    with pytest.raises(TypeError):
        p.logit_bias[7] = 1.0
    assert hash(p) == hash(SamplingParams(logit_bias={9: 1.0}))  # hash ignores it; equality does not
    assert p != SamplingParams() and dataclasses.replace(p, max_tokens=3).logit_bias == {5: 1.5}
