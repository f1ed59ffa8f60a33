"""KV hand-off between TP sizes: reshard_kv's regrouping, the shard-set and layout checks, and prefill and decode
engines at different TP sizes giving a colocated engine's tokens."""
import dataclasses

import pytest
import torch

from workers import LLM, SamplingParams
from workers.kv.handoff import KV_LAYOUT, KVPayload
from workers.kv.reshard import check_shard_set, reshard_kv
from workers.kv_transfer.wire import payload_from_header, payload_header

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = [100 + 3 * i for i in range(37)]  # 3 blocks of 16, the last one partial


def full_kv(num_heads: int, num_blocks: int = 3) -> torch.Tensor:
    """[layers, 2, blocks, block_size, heads, head_dim] where every head's values are distinct."""
    return torch.arange(2 * 2 * num_blocks * 4 * num_heads * 8, dtype=torch.float32).view(2, 2, num_blocks, 4,
                                                                                         num_heads, 8)


def shards_of(kv: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """What a TP group of tp_size exports: rank r's contiguous share of the heads (shard_range)."""
    return [part.contiguous() for part in kv.chunk(tp_size, dim=4)]


@pytest.mark.parametrize("num_heads,from_size,to_size", [
    (8, 1, 2), (8, 2, 1), (8, 1, 8), (8, 8, 1), (8, 2, 4), (8, 4, 2), (6, 2, 3), (6, 3, 2), (2, 2, 1), (2, 1, 2),
])
def test_reshard_gives_each_rank_its_heads(num_heads, from_size, to_size):
    kv = full_kv(num_heads)
    got = reshard_kv(shards_of(kv, from_size), to_size)
    assert len(got) == to_size
    for want, shard in zip(shards_of(kv, to_size), got):
        assert shard.is_contiguous(), "transports and index_copy_ want contiguous tensors"
        assert torch.equal(shard, want)
    assert torch.equal(torch.cat(reshard_kv(got, from_size), dim=4), kv), "and back again"


def test_reshard_to_the_same_size_returns_the_input():
    shards = shards_of(full_kv(4), 2)
    assert reshard_kv(shards, 2) is shards


@pytest.mark.parametrize("num_heads,from_size,to_size,match", [
    (2, 1, 4, "tp_size: 4 must divide num_kv_heads=2"),
    (6, 2, 4, "tp_size: 4 must divide num_kv_heads=6"),
    (8, 4, 3, "tp_size: 3 must divide num_kv_heads=8"),
    (8, 2, 0, "tp_size: must be >= 1"),
])
def test_reshard_refuses_sizes_that_do_not_divide_the_heads(num_heads, from_size, to_size, match):
    with pytest.raises(ValueError, match=match):
        reshard_kv(shards_of(full_kv(num_heads), from_size), to_size)


def test_reshard_refuses_mismatched_or_missing_shards():
    a, b = shards_of(full_kv(4), 2)
    with pytest.raises(ValueError, match="num_kv_heads: shard 1"):
        reshard_kv([a, b[..., :1, :]], 1)
    with pytest.raises(ValueError, match="tp_size: no KV shards"):
        reshard_kv([], 1)


def make_payloads(tp_size: int, num_heads: int = 4) -> list[KVPayload]:
    num_tokens = 11
    return [
        KVPayload(request_id="r", model="m", block_size=4, dtype="float32", tp_rank=rank, tp_size=tp_size,
                  num_kv_heads_total=num_heads, prompt_token_ids=list(range(num_tokens)), output_token_ids=[5],
                  num_computed_tokens=num_tokens, num_cached_tokens=0, kv=kv)
        for rank, kv in enumerate(shards_of(full_kv(num_heads), tp_size))
    ]


def test_a_complete_shard_set_passes():
    check_shard_set(make_payloads(2))
    check_shard_set(make_payloads(1))


@pytest.mark.parametrize("corrupt,match", [
    (lambda ps: ps[:1], "tp_size: got 1 KV payload shards, the payloads say tp_size=2"),
    (lambda ps: ps + ps[:1], "tp_size: got 3"),
    (lambda ps: [ps[1], ps[0]], "tp_rank: shard 0 has tp_rank=1"),
    (lambda ps: [ps[0], ps[0]], "tp_rank: shard 1 has tp_rank=0"),
    (lambda ps: [ps[0], dataclasses.replace(ps[1], request_id="other")], "request_id: shard 1"),
    (lambda ps: [ps[0], dataclasses.replace(ps[1], dtype="bfloat16")], "dtype: shard 1"),
    (lambda ps: [ps[0], dataclasses.replace(ps[1], num_computed_tokens=7)], "num_computed_tokens: shard 1"),
    (lambda ps: [ps[0], dataclasses.replace(ps[1], layout="other")], "layout: shard 1"),
    (lambda ps: [ps[0], dataclasses.replace(ps[1], kv=ps[1].kv[:, :, :2])], "kv: shard 1"),
    (lambda ps: [], "tp_size: no KV payload shards"),
])
def test_an_incomplete_or_inconsistent_shard_set_is_refused_by_name(corrupt, match):
    with pytest.raises(ValueError, match=match):
        check_shard_set(corrupt(make_payloads(2)))


def test_check_compatible_accepts_any_source_tp_size_that_divides_the_heads():
    fits = dict(model="m", block_size=4, dtype="float32", num_layers=2, num_kv_heads_total=4, head_dim=8)
    for tp_size in (1, 2, 4):
        for p in make_payloads(tp_size):
            p.check_compatible(**fits)
    (p,) = make_payloads(1)
    for field, value, match in [
        ("layout", "tandem.kv.v0", "layout: KV payload has 'tandem.kv.v0'"),
        ("num_kv_heads_total", 8, "num_kv_heads_total: KV payload has 8, this engine has 4"),
        ("tp_size", 3, "tp_size: KV payload has 3, which does not divide num_kv_heads_total=4"),
        ("tp_rank", 1, "tp_rank: KV payload has 1, outside tp_size=1"),
    ]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(p, **{field: value}).check_compatible(**fits)


def test_the_layout_header_crosses_the_wire_and_old_headers_still_read():
    p = make_payloads(2)[1]
    header, token_bytes = payload_header(p)
    kv_bytes = p.kv.contiguous().view(torch.uint8).view(-1)
    got = payload_from_header(header, token_bytes, kv_bytes)
    assert (got.layout, got.num_kv_heads_total, got.tp_rank, got.tp_size) == (KV_LAYOUT, 4, 1, 2)
    old = {k: v for k, v in header.items() if k not in ("layout", "num_kv_heads_total")}
    got = payload_from_header(old, token_bytes, kv_bytes)
    assert (got.layout, got.num_kv_heads_total) == (KV_LAYOUT, 4), "a sender from before the header: v1, heads x tp"


# --- engines at different TP sizes ---------------------------------------------------------------------


def prefill_payloads(folder: str, tp_size: int):
    """The first token and every rank's KV payload of PROMPT, from a prefill engine at tp_size."""
    with LLM(folder, device="cpu", dtype="float32", role="prefill", tensor_parallel_size=tp_size) as prefill:
        engine = prefill.engine
        req_id = engine.add_request(PROMPT, GREEDY)
        events = []
        while not events:
            events = engine.step()
        payloads = engine.export_kv(req_id)
        engine.release_kv(req_id)
    return list(events[0].new_token_ids), payloads


def decode_tokens(folder: str, tp_size: int, payloads: list[KVPayload]) -> list[int]:
    with LLM(folder, device="cpu", dtype="float32", role="decode", tensor_parallel_size=tp_size) as decode:
        engine = decode.engine
        req_id = engine.import_kv(payloads, GREEDY)
        tokens = []
        while engine.has_unfinished_requests():
            for ev in engine.step():
                assert ev.req_id == req_id
                tokens += ev.new_token_ids
        stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks, "the imported request's blocks are freed at the end"
    return tokens


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    with LLM(folder, device="cpu", dtype="float32") as colocated:
        assert colocated.engine.model_config.num_key_value_heads == 2, "TP 1 and 2 both divide the KV heads"
        (expected,) = colocated.generate([PROMPT], GREEDY)
    return folder, expected.token_ids


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)])
def test_handoff_across_tp_sizes_matches_colocated(llama, prefill_tp, decode_tp):
    folder, expected = llama
    first, payloads = prefill_payloads(folder, prefill_tp)
    assert [(p.tp_rank, p.tp_size, p.num_kv_heads_total, p.kv.shape[4]) for p in payloads] == [
        (rank, prefill_tp, 2, 2 // prefill_tp) for rank in range(prefill_tp)
    ]
    assert first + decode_tokens(folder, decode_tp, payloads) == expected
