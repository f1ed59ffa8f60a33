import math

import pytest
import torch

from workers.sampler import Sampler, SamplingBatch, apply_penalties, seed_for_step
from workers.sampling_params import SamplingParams

VOCAB = 64
EOS = 2


def make_batch(params, prompts=None, outputs=None, eos=(EOS,)):
    prompts = prompts if prompts is not None else [[5, 6, 7] for _ in params]
    outputs = outputs if outputs is not None else [[] for _ in params]
    return SamplingBatch.build(params, prompts, outputs, eos, "cpu")


def logits_from_probs(probs, num_rows=1):
    return torch.tensor(probs, dtype=torch.float32).log().expand(num_rows, -1).contiguous()


@pytest.fixture
def sampler():
    return Sampler()


def test_build_sets_flags():
    batch = make_batch([SamplingParams(temperature=0.0), SamplingParams(top_k=5, logprobs=3)])
    assert not batch.all_greedy and not batch.all_random
    assert batch.greedy_mask.tolist() == [True, False]
    assert not batch.no_top_k and batch.no_top_p and batch.no_min_p and batch.no_penalties
    assert batch.max_num_logprobs == 3
    assert batch.steps == [0, 0]
    # Greedy rows carry neutral values, so a greedy row's top_p does not turn the top-p path on.
    batch = make_batch([SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.5)])
    assert batch.all_greedy and batch.no_top_k and batch.no_top_p and batch.no_min_p


def test_greedy_is_argmax(sampler):
    torch.manual_seed(0)
    logits = torch.randn(8, VOCAB)
    out = sampler(logits, make_batch([SamplingParams(temperature=0.0)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None and out.top_logprob_ids is None


def test_greedy_rows_in_mixed_batch_are_argmax(sampler):
    torch.manual_seed(1)
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, top_p=0.9, seed=i) for i in range(6)]
    out = sampler(logits, make_batch(params))
    argmax = logits.argmax(-1).tolist()
    assert [t for i, t in enumerate(out.token_ids) if i % 2] == [t for i, t in enumerate(argmax) if i % 2]


def test_logits_are_not_modified(sampler):
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    sampler(logits, make_batch([SamplingParams(repetition_penalty=1.5, top_k=3)] * 2, outputs=[[1, 2], [3]]))
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy(sampler):
    torch.manual_seed(2)
    logits = torch.randn(16, VOCAB)
    out = sampler(logits, make_batch([SamplingParams(temperature=1.5, top_k=1)] * 16))
    assert out.token_ids == logits.argmax(-1).tolist()


PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 + 0.3 is the smallest set with mass >= 0.7
        (SamplingParams(top_p=0.5), {0}),
        (SamplingParams(min_p=0.2), {0, 1, 2}),  # threshold 0.2 * 0.5 = 0.1 drops 0.05
        (SamplingParams(min_p=0.7), {0}),
        (SamplingParams(top_k=3, top_p=0.7, temperature=2.0), {0, 1}),  # T=2 top-3: .43, .33, .24
    ],
)
def test_filters_never_pick_masked_tokens(sampler, params, allowed):
    torch.manual_seed(3)
    num_rows = 2000
    out = sampler(logits_from_probs(PROBS, num_rows), make_batch([params] * num_rows))
    # Every allowed token shows up, nothing else ever does.
    assert set(out.token_ids) == allowed


def test_filters_apply_per_row(sampler):
    torch.manual_seed(4)
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(min_p=0.7), SamplingParams(top_p=0.7)]
    num_rep = 500
    out = sampler(logits_from_probs(PROBS, 4 * num_rep), make_batch(params * num_rep))
    by_row = [set(out.token_ids[i::4]) for i in range(4)]
    assert by_row == [{0}, {0, 1, 2, 3}, {0}, {0, 1}]


def seeded_uniform_logits(num_rows, vocab=1000):
    return torch.zeros(num_rows, vocab)


def test_seeded_rows_reproducible_across_calls_and_batches(sampler):
    torch.manual_seed(5)
    logits = torch.randn(1, 1000)
    p = SamplingParams(seed=1234)
    alone = sampler(logits, make_batch([p], outputs=[[9] * 3])).token_ids[0]
    assert sampler(logits, make_batch([p], outputs=[[9] * 3])).token_ids[0] == alone
    # Same row at another position in a bigger batch with other params (top-k, unseeded, greedy, penalties).
    others = [SamplingParams(top_k=5), SamplingParams(), SamplingParams(temperature=0.0),
              SamplingParams(presence_penalty=1.0, seed=7)]
    big_logits = torch.cat([torch.randn(2, 1000), logits, torch.randn(2, 1000)])
    big_params = others[:2] + [p] + others[2:]
    outputs = [[1], [2, 3], [9] * 3, [], [4]]
    # A different process would have a different default generator state.
    torch.manual_seed(99)
    assert Sampler()(big_logits, make_batch(big_params, outputs=outputs)).token_ids[2] == alone
    # A fresh Sampler (another worker) and a different prompt give the same token too.
    assert Sampler()(logits, make_batch([p], prompts=[[1, 2]], outputs=[[8] * 3])).token_ids[0] == alone


def test_seeded_rows_differ_across_steps_and_seeds(sampler):
    logits = seeded_uniform_logits(1)
    p = SamplingParams(seed=42)
    by_step = [sampler(logits, make_batch([p], outputs=[[0] * step])).token_ids[0] for step in range(20)]
    assert len(set(by_step)) > 15
    by_seed = [sampler(logits, make_batch([SamplingParams(seed=s)])).token_ids[0] for s in range(20)]
    assert len(set(by_seed)) > 15
    assert seed_for_step(1, 2) != seed_for_step(2, 1)
    assert seed_for_step(-1, 0) >= 0


def test_unseeded_rows_vary(sampler):
    logits = seeded_uniform_logits(1)
    tokens = [sampler(logits, make_batch([SamplingParams()])).token_ids[0] for _ in range(20)]
    assert len(set(tokens)) > 15


def test_penalties_match_hand_computation():
    logits = torch.tensor([[1.0, 2.0, -1.0, 4.0, 0.5]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    batch = make_batch([p], prompts=[[1, 2]], outputs=[[2, 3, 3]])
    got = apply_penalties(logits.clone(), batch)
    # token 0: unseen; 1: prompt only, positive -> /2; 2: seen, negative -> *2, once in output -> -0.25-0.5;
    # 3: positive -> /2, twice in output -> -0.5-0.5; 4: unseen.
    expected = torch.tensor([[1.0, 1.0, -2.0 - 0.25 - 0.5, 2.0 - 0.5 - 0.5, 0.5]])
    torch.testing.assert_close(got, expected)


def test_penalties_are_per_row_and_change_greedy(sampler):
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0]] * 2)
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.0), SamplingParams(temperature=0.0)]
    out = sampler(logits, make_batch(params, prompts=[[0], [0]], outputs=[[1], [1]], eos=()))
    assert out.token_ids == [2, 1]


def test_min_tokens_bans_eos_and_stop_token_ids(sampler):
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 9] = 9.0
    logits[0, 4] = 8.0
    greedy_min2 = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    assert sampler(logits, make_batch([greedy_min2], outputs=[[1]])).token_ids == [4]
    # min_tokens reached: nothing banned.
    assert sampler(logits, make_batch([greedy_min2], outputs=[[1, 1]])).token_ids == [EOS]
    # ignore_eos: eos is not a stop, so only the stop token ids are banned.
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9], ignore_eos=True)
    assert sampler(logits, make_batch([ignore], outputs=[[1]])).token_ids == [EOS]
    # Random sampling never picks a banned token.
    torch.manual_seed(6)
    random_min = SamplingParams(min_tokens=1, stop_token_ids=[9])
    out = sampler(logits.expand(500, -1), make_batch([random_min] * 500))
    assert EOS not in out.token_ids and 9 not in out.token_ids


def test_logprobs_are_raw_log_softmax(sampler):
    torch.manual_seed(7)
    logits = torch.randn(3, VOCAB)
    params = [
        SamplingParams(logprobs=3, temperature=0.7, top_k=10, repetition_penalty=1.3),
        SamplingParams(logprobs=0),
        SamplingParams(),
    ]
    out = sampler(logits, make_batch(params, outputs=[[1, 2], [], [3]]))
    raw = torch.log_softmax(logits, dim=-1)
    expected = raw[torch.arange(3), torch.tensor(out.token_ids)]
    torch.testing.assert_close(out.logprobs, expected)
    top = raw.topk(3, dim=-1)
    assert out.top_logprob_ids.shape == (3, 3)
    assert torch.equal(out.top_logprob_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values)


def test_logprobs_zero_returns_only_sampled(sampler):
    logits = torch.randn(1, VOCAB)
    out = sampler(logits, make_batch([SamplingParams(temperature=0.0, logprobs=0)]))
    assert out.top_logprobs is None and out.top_logprob_ids is None
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).max(-1).values)


def _assert_frequencies(token_ids, probs):
    n = len(token_ids)
    for token, p in enumerate(probs):
        freq = token_ids.count(token) / n
        # 6 standard deviations: fails with probability ~1e-9 per token.
        assert abs(freq - p) < 6 * math.sqrt(p * (1 - p) / n), (token, freq, p)


def test_sampling_frequencies_match_distribution(sampler):
    torch.manual_seed(8)
    probs = [0.5, 0.3, 0.15, 0.05]
    num_rows = 20000
    out = sampler(logits_from_probs(probs, num_rows), make_batch([SamplingParams()] * num_rows))
    _assert_frequencies(out.token_ids, probs)
    # Temperature 0.5 squares the probabilities (then renormalizes).
    out = sampler(logits_from_probs(probs, num_rows), make_batch([SamplingParams(temperature=0.5)] * num_rows))
    squared = [p * p for p in probs]
    _assert_frequencies(out.token_ids, [p / sum(squared) for p in squared])


def test_seeded_sampling_frequencies_match_distribution(sampler):
    # Across many seeds the per-row generators must still draw from the right distribution.
    probs = [0.5, 0.3, 0.15, 0.05]
    num_rows = 4000
    params = [SamplingParams(seed=s) for s in range(num_rows)]
    out = sampler(logits_from_probs(probs, num_rows), make_batch(params))
    _assert_frequencies(out.token_ids, probs)


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_one(sampler):
    torch.manual_seed(3)
    logits = torch.randn(4, VOCAB) * 5  # [B, V]
    top = logits.argmax(-1).tolist()
    forced, params = 17, [SamplingParams(temperature=0.0, logit_bias={17: 100}),
                          SamplingParams(temperature=0.0, logit_bias={top[1]: -100}),
                          SamplingParams(temperature=1.0, seed=5, logit_bias={17: 100}),
                          SamplingParams(temperature=0.0)]
    out = sampler(logits, make_batch(params))
    assert out.token_ids[0] == forced and out.token_ids[2] == forced
    assert out.token_ids[1] != top[1] and out.token_ids[1] == logits[1].topk(2).indices[1].item()
    assert out.token_ids[3] == top[3]  # a row without a bias is untouched by its neighbours'
    # Logprobs stay those of the model (vLLM's default): the bias changes the choice, not the reported logprob.
    out = sampler(logits[:1], make_batch([SamplingParams(temperature=0.0, logit_bias={17: 100}, logprobs=0)]))
    assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[17].item(), abs=1e-5)


def test_min_tokens_ignores_stop_token_ids_outside_the_vocabulary(sampler):
    # Such an id can never be sampled; it must not ban a token of the next row either (bans use flat indices).
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 10.0
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[VOCAB + 3], ignore_eos=True),
              SamplingParams(temperature=0.0)]
    assert sampler(logits, make_batch(params)).token_ids == [3, 3]


def test_logit_bias_outside_the_vocabulary_is_an_error(sampler):
    with pytest.raises(ValueError, match="logit_bias"):
        sampler(torch.zeros(2, VOCAB), make_batch([SamplingParams(logit_bias={VOCAB + 1: 5.0}), SamplingParams()]))
