"""Generate through a real router against fake workers: the paths a request takes and what the client sees."""
from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import wait_for
from tests.router.helpers import LONG_TEXT, Stream, text_request


def decoded(model, ids: list[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_disaggregated_request_prefills_then_hands_off_and_streams(make_env, script):
    env = make_env(prefill=1, decode=1)
    out = Stream(env.generate(text_request(max_tokens=10)))
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")

    assert out.token_ids == script[:10]
    assert out.text == decoded(env.model, script[:10])
    # The first token comes alone, straight from the prefill worker.
    assert list(out.chunks[0].token_ids) == script[:1]
    prompt = env.model.tokenizer.encode(LONG_TEXT, add_special_tokens=True)
    assert list(prefill.prefills[0].request.prompt_token_ids) == prompt
    assert decode.decodes[0].HasField("kv") and decode.decodes[0].kv.transfer_id
    assert not prefill.held, "the decode side took the KV"
    last = out.chunks[-1]
    assert (last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (len(prompt), 10, 3)

    complete = out.complete
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert (complete.usage.prompt_tokens, complete.usage.completion_tokens, complete.usage.cached_tokens) == (
        len(prompt), 10, 3)
    t = complete.timings
    assert t.queue_ms >= 1.5 and t.prefill_ms == pytest.approx(7.0) and t.kv_transfer_ms == pytest.approx(2.0)
    assert 0 < t.first_token_ms <= t.e2e_ms and t.num_migrations == 0
    [request_id] = out.request_ids
    assert request_id.startswith("req-") and len(request_id) == 36


def test_client_request_id_is_echoed_and_stream_runs_to_eos(make_env, script):
    env = make_env(prefill=1, decode=1)
    req = text_request(max_tokens=200)
    req.request_id = "my-id"
    out = Stream(env.generate(req))
    assert out.request_ids == {"my-id"}
    assert out.token_ids == script
    assert out.complete.finish_reason == pb.FINISH_REASON_STOP
    assert not out.complete.HasField("stop_str") and not out.complete.HasField("stop_token_id")


def test_colocated_mode_decodes_without_prefill_workers(make_env, script):
    env = make_env(prefill=0, decode=0, both=1)
    assert env.router.config.mode == "colocated"
    out = Stream(env.generate(text_request(max_tokens=5)))
    [worker] = env.workers
    assert out.token_ids == script[:5]
    assert not worker.prefills
    [call] = worker.decodes
    assert not call.HasField("kv") and not call.request.output_token_ids
    assert out.complete.timings.prefill_ms == pytest.approx(4.0)
    assert out.complete.timings.kv_transfer_ms == 0


def test_short_prompt_is_prefilled_on_the_decode_worker(make_env, script):
    env = make_env(prefill=1, decode=1, max_local_prefill_length=64)
    out = Stream(env.generate(text_request("Hi!", max_tokens=4)))
    assert out.token_ids == script[:4]
    assert not env.by_role("prefill")[0].prefills
    assert not env.by_role("decode")[0].decodes[0].HasField("kv")


def test_prompt_cached_on_the_decode_worker_is_prefilled_there(make_env, script):
    env = make_env(prefill=1, decode=1, max_local_prefill_length=8)
    [decode] = env.by_role("decode")
    decode.num_cached_prefix = 1000  # all but the last prompt token
    out = Stream(env.generate(text_request(max_tokens=4)))
    assert out.token_ids == script[:4]
    assert not env.by_role("prefill")[0].prefills
    assert out.complete.usage.cached_tokens == out.complete.usage.prompt_tokens - 1


def test_request_finished_by_prefill_never_reaches_decode(make_env, script):
    env = make_env(prefill=1, decode=1)
    out = Stream(env.generate(text_request(max_tokens=1)))
    assert out.token_ids == script[:1]
    assert out.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert not env.by_role("decode")[0].decodes


def test_token_id_and_chat_prompts(make_env, served_model, script):
    env = make_env(prefill=1, decode=1)
    ids = [1, 2, 3, 4, 5, 6, 7]
    Stream(env.generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=2))))
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Write a haiku.")])
    Stream(env.generate(pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(max_tokens=2))))
    [prefill] = env.by_role("prefill")
    assert list(prefill.prefills[0].request.prompt_token_ids) == ids
    tok = served_model.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": "Write a haiku."}], tokenize=False,
                                       add_generation_prompt=True)
    assert list(prefill.prefills[1].request.prompt_token_ids) == tok.encode(rendered, add_special_tokens=False)


def test_logprobs_are_forwarded_when_asked(make_env, script):
    env = make_env(prefill=1, decode=1)
    out = Stream(env.generate(text_request(max_tokens=3, logprobs=1)))
    assert [lp.token_id for c in out.chunks for lp in c.logprobs] == script[:3]
    plain = Stream(env.generate(text_request(max_tokens=3)))
    assert not any(c.logprobs for c in plain.chunks)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_text_and_cancels_decode(make_env, served_model, script, include):
    env = make_env(prefill=1, decode=1, worker_options={})
    [decode] = env.by_role("decode")
    decode.token_delay_s = 0.01
    out = Stream(env.generate(text_request(max_tokens=200, stop=["lazy"], include_stop_str_in_output=include)))
    full = decoded(served_model, script)
    expected = full[:full.index("lazy") + (len("lazy") if include else 0)]
    assert out.text == expected
    assert out.complete.finish_reason == pb.FINISH_REASON_STOP and out.complete.stop_str == "lazy"
    assert len(out.token_ids) < len(script)
    assert out.complete.usage.completion_tokens == len(out.token_ids)
    engine_id = decode.decodes[0].request.request_id
    wait_for(lambda: engine_id in decode.cancelled and engine_id in decode.aborted, what="decode call cancelled")


def test_stop_string_inside_a_coalesced_message_ends_at_its_token(make_env, served_model, script):
    env = make_env(prefill=1, decode=1)
    [decode] = env.by_role("decode")
    decode.tokens_per_message = 5
    out = Stream(env.generate(text_request(max_tokens=200, stop=["lazy"], logprobs=0)))
    full = decoded(served_model, script)
    assert out.text == full[:full.index("lazy")]
    # Token ids stop at the one that completed the stop string, as if they had come one at a time.
    n = len(out.token_ids)
    assert "lazy" in decoded(served_model, script[:n]) and "lazy" not in decoded(served_model, script[:n - 1])
    assert out.token_ids == script[:n] and out.complete.usage.completion_tokens == n
    assert [lp.token_id for c in out.chunks for lp in c.logprobs] == script[:n]


def test_coalesced_messages_stream_every_token(make_env, script):
    env = make_env(prefill=1, decode=1)
    env.by_role("decode")[0].tokens_per_message = 3
    out = Stream(env.generate(text_request(max_tokens=11)))
    assert out.token_ids == script[:11]
    assert [len(c.token_ids) for c in out.chunks] == [1, 3, 3, 3, 1]


def test_unexpected_router_error_is_internal_and_the_router_keeps_serving(make_env, monkeypatch):
    from router.request import GenerateCall

    env = make_env(prefill=1, decode=1)
    original = GenerateCall._complete

    async def broken(self, *args):
        raise RuntimeError("bug")

    monkeypatch.setattr(GenerateCall, "_complete", broken)
    err = rpc_error(env, text_request(max_tokens=3))
    assert err.code() == grpc.StatusCode.INTERNAL and "RuntimeError: bug" in err.details()
    monkeypatch.setattr(GenerateCall, "_complete", original)
    assert Stream(env.generate(text_request(max_tokens=3))).complete
    # The decode call of the failed request is gone from the workers' view too.
    assert env.router.num_active == 0


def test_stop_token_id_is_reported(make_env, script):
    env = make_env(prefill=1, decode=1)
    # The fake stops only at the end of its script; the last token is named as a stop token id.
    out = Stream(env.generate(text_request(max_tokens=200, stop_token_ids=[script[-1]])))
    assert out.complete.finish_reason == pb.FINISH_REASON_STOP
    assert out.complete.stop_token_id == script[-1]


# --- rejected requests ---------------------------------------------------------------------------------------

def rpc_error(env, request: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        env.generate(request)
    return info.value


def test_unknown_model_is_not_found(make_env):
    env = make_env()
    req = text_request()
    req.model = "llama-9000"
    err = rpc_error(env, req)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "model" in err.details() and env.model.name in err.details()
    req.model = env.model.name
    assert Stream(env.generate(req)).complete


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2)), "input"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=2.0)), "top_p"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10**6])), "input"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "input"),
    (pb.GenerateRequest(text="hi " * 600), "max_model_len"),
])
def test_invalid_arguments_name_the_field(make_env, request_, field):
    env = make_env()
    err = rpc_error(env, request_)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()
    assert not env.by_role("prefill")[0].prefills and not env.by_role("decode")[0].decodes


def test_out_of_vocab_message_names_the_id(make_env):
    env = make_env()
    err = rpc_error(env, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 10**6])))
    assert err.details().startswith("input:") and str(10**6) in err.details() and "49152" in err.details()


def test_no_live_worker_is_unavailable(make_env):
    env = make_env(prefill=1, decode=0, wait_ready=False)
    wait_for(lambda: env.router.pool.num_live("prefill") == 1, what="prefill worker up")
    err = rpc_error(env, text_request())
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "decode pool" in err.details()


def test_queue_bound_rejects_with_resource_exhausted(make_env):
    env = make_env(prefill=1, decode=1, max_queued_requests=1)
    [prefill] = env.by_role("prefill")
    prefill.prefill_delay_s = 30
    first = env.stub.Generate(text_request(), timeout=30)
    wait_for(lambda: prefill.prefills, what="first request at the prefill worker")
    err = rpc_error(env, text_request())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "prefill pool" in err.details() and "max_queued_requests=1" in err.details()
    first.cancel()
    wait_for(lambda: env.router.admission.num_queued("prefill") == 0, what="admission released")
    prefill.prefill_delay_s = 0
    assert Stream(env.generate(text_request(max_tokens=2))).complete


def test_worker_verdicts_pass_through(make_env):
    env = make_env(prefill=1, decode=1)
    [prefill] = env.by_role("prefill")
    prefill.prefill_error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full")
    err = rpc_error(env, text_request())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "waiting queue is full" in err.details()
    prefill.prefill_error = (grpc.StatusCode.INVALID_ARGUMENT, "priority: bad")
    err = rpc_error(env, text_request())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "priority: bad"
    prefill.prefill_error = (grpc.StatusCode.INTERNAL, "boom")
    err = rpc_error(env, text_request())
    assert err.code() == grpc.StatusCode.INTERNAL and "boom" in err.details()
    # The router keeps serving.
    prefill.prefill_error = None
    assert Stream(env.generate(text_request(max_tokens=2))).complete
