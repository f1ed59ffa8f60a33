"""Stop semantics and logprobs of partial characters through the router and real workers (the default GGUF,
greedy), on both fronts: gRPC Generate, and HTTP /v1/completions and /v1/chat/completions, streamed and not.

The rules (workers/detokenizer.py, as vLLM's): a stop string ends a request only after `min_tokens` tokens; the
text of a stop token (stop_token_ids, EOS) is left out unless include_stop_str_in_output. Logprobs carry each
token's own bytes (router/token_bytes.py)."""
from __future__ import annotations

import pytest

from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import real_router_env
from tests.router.helpers import Stream
from tests.router.test_openai_http import HTTPClient
from tests.servers import worker_servers

pytestmark = pytest.mark.slow

P = "1, 2, 3, 4, 5,"  # greedy: " 6, 7, 8, 9, 10, 11," = ' ', '6', ',', ' ', '7', ',', ...
COMMA = 28  # the token ","
# (sampling, text, completion tokens, stop string or stop token id)
STOP_CASES = [
    (dict(max_tokens=20, stop=[","]), " 6", 3, ","),
    # The example: "," may only end the request once min_tokens=8 tokens exist.
    (dict(max_tokens=20, min_tokens=8, stop=[","]), " 6, 7, 8", 9, ","),
    (dict(max_tokens=20, min_tokens=5, stop=[","]), " 6, 7", 6, ","),
    (dict(max_tokens=20, min_tokens=8, stop=[","], include_stop_str_in_output=True), " 6, 7, 8,", 9, ","),
    # A match may start within the first min_tokens tokens and end after them.
    (dict(max_tokens=20, min_tokens=4, stop=[", 7"]), " 6", 5, ", 7"),
    (dict(max_tokens=20, min_tokens=4, stop=["9", ","]), " 6, 7", 6, ","),
    # The example: a stop token's text is left out, like vLLM, unless include_stop_str_in_output.
    (dict(max_tokens=10, stop_token_ids=[COMMA]), " 6", 3, COMMA),
    (dict(max_tokens=10, stop_token_ids=[COMMA], include_stop_str_in_output=True), " 6,", 3, COMMA),
    (dict(max_tokens=3, stop=["7"]), " 6,", 3, None),  # max_tokens first: "length", nothing cut
]
EMOJI_CHAT = [{"role": "user", "content": "Reply with only one emoji."}]
STAR = "🌟"  # its greedy answer: 3 byte-level tokens, none of them a whole character


@pytest.fixture(scope="module")
def real_workers():
    with worker_servers(("prefill", "decode")) as workers:
        yield workers


@pytest.fixture(scope="module")
def router_env(aio, served_model, real_workers):
    # max_local_prefill_length=0: every request is prefilled on the prefill worker and handed off, so a first
    # token and the rest come from different workers.
    env = real_router_env(aio, served_model, real_workers, max_local_prefill_length=0)
    yield env
    env.close()


@pytest.fixture
def env(router_env):
    router_env.http = HTTPClient(router_env.router.http_address, timeout_s=60)
    yield router_env
    router_env.http.close()


def grpc_sampling(sampling: dict) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0, **sampling)


# --- kind 3: stop semantics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling,text,num_tokens,stop", STOP_CASES)
def test_stop_rules_over_grpc(env, sampling, text, num_tokens, stop):
    out = Stream(env.generate(pb.GenerateRequest(text=P, sampling=grpc_sampling(sampling)), timeout=60))
    assert out.text == text and len(out.token_ids) == num_tokens
    assert out.complete.usage.completion_tokens == num_tokens
    if stop is None:
        assert out.complete.finish_reason == pb.FINISH_REASON_LENGTH
    else:
        assert out.complete.finish_reason == pb.FINISH_REASON_STOP
        assert (out.complete.stop_str if isinstance(stop, str) else out.complete.stop_token_id) == stop
    if isinstance(stop, int):
        assert out.token_ids[-1] == stop  # the stop token's id stays; only its text is left out


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sampling,text,num_tokens,stop", STOP_CASES)
def test_stop_rules_over_http_completions(env, sampling, text, num_tokens, stop, stream):
    body = {"prompt": P, "temperature": 0, **sampling}
    finish = "length" if stop is None else "stop"
    if not stream:
        status, _, resp = env.http.json("POST", "/v1/completions", body)
        assert status == 200, resp
        assert resp["choices"][0]["text"] == text and resp["choices"][0]["finish_reason"] == finish
        assert resp["usage"]["completion_tokens"] == num_tokens
        return
    resp, events = env.http.events("/v1/completions", {**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    assert resp.status == 200 and events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
    assert events[-2]["usage"]["completion_tokens"] == num_tokens


def test_stop_token_is_never_sampled_before_min_tokens(env):
    # The sampler bans "," for the first 4 tokens, so greedy takes another path; "," then stops it.
    sampling = dict(max_tokens=30, min_tokens=4, stop_token_ids=[COMMA])
    out = Stream(env.generate(pb.GenerateRequest(text=P, sampling=grpc_sampling(sampling)), timeout=60))
    assert COMMA not in out.token_ids[:4]
    if out.complete.finish_reason == pb.FINISH_REASON_STOP:
        assert out.token_ids[-1] == COMMA and out.token_ids.count(COMMA) == 1 and not out.text.endswith(",")
    status, _, resp = env.http.json("POST", "/v1/completions", {"prompt": P, "temperature": 0, **sampling})
    assert status == 200 and resp["choices"][0]["text"] == out.text


def chat_answer(env, **options) -> tuple[str, dict]:
    status, _, resp = env.http.json("POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0,
                                     **options})
    assert status == 200, resp
    return resp["choices"][0]["message"]["content"], resp


@pytest.mark.parametrize("stream", [False, True])
def test_chat_stop_strings_wait_for_min_tokens(env, served_model, stream):
    free, resp = chat_answer(env, max_tokens=24, ignore_eos=True)
    grpc_free = Stream(env.generate(pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Say hi.")]),
        sampling=grpc_sampling(dict(max_tokens=24, ignore_eos=True))), timeout=60))
    assert grpc_free.text == free and " " in free
    min_tokens = 4
    head = served_model.tokenizer.decode(grpc_free.token_ids[:min_tokens])
    # The first " " that ends after the text of the first min_tokens tokens.
    expected = free[:free.index(" ", len(head))]
    body = {"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 24,
            "min_tokens": min_tokens, "stop": [" "]}
    if stream:
        _, events = env.http.events("/v1/chat/completions", {**body, "stream": True})
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
    else:
        status, _, resp = env.http.json("POST", "/v1/chat/completions", body)
        text = resp["choices"][0]["message"]["content"]
        assert resp["choices"][0]["finish_reason"] == "stop"
    assert text == expected


def test_eos_before_min_tokens_does_not_end_the_chat(env):
    text, resp = chat_answer(env, max_tokens=64)
    n = resp["usage"]["completion_tokens"]
    assert resp["choices"][0]["finish_reason"] == "stop" and n < 40  # ends on EOS, whose text is not shown
    _, longer = chat_answer(env, max_tokens=64, min_tokens=n + 8)
    assert longer["usage"]["completion_tokens"] >= n + 8
    assert "<|im_end|>" not in longer["choices"][0]["message"]["content"]
    assert longer["choices"][0]["message"]["content"].startswith(text)


# --- kind 4: logprobs of tokens that are part of a character ---------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprob_bytes_make_up_the_emoji(env, stream):
    body = {"messages": EMOJI_CHAT, "temperature": 0, "max_tokens": 3, "logprobs": True, "top_logprobs": 3}
    if stream:
        _, events = env.http.events("/v1/chat/completions", {**body, "stream": True})
        choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
        content = "".join(c["delta"].get("content") or "" for c in choices)
        entries = [x for c in choices if c["logprobs"] for x in c["logprobs"]["content"]]
    else:
        status, _, resp = env.http.json("POST", "/v1/chat/completions", body)
        assert status == 200, resp
        content = resp["choices"][0]["message"]["content"]
        entries = resp["choices"][0]["logprobs"]["content"]
    assert content == STAR and len(entries) == 3
    assert b"".join(bytes(e["bytes"]) for e in entries) == STAR.encode("utf-8")
    for e in entries:
        assert e["bytes"] != [239, 191, 189] and "\ufffd" not in e["token"]
        tops = e["top_logprobs"]
        assert len(tops) == 3 and len({t["token"] for t in tops}) == 3 and len({bytes(t["bytes"]) for t in tops}) == 3
        assert tops == sorted(tops, key=lambda t: -t["logprob"]) and len({t["logprob"] for t in tops}) == 3
        assert tops[0]["token"] == e["token"] and tops[0]["logprob"] == e["logprob"]  # greedy
    assert entries[0]["token"] == "\\xf0\\x9f"  # partial bytes as escapes, as OpenAI-compatible servers show them


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_keep_every_candidate_and_offsets_in_the_text(env, served_model, stream):
    prompt = served_model.encode_chat(EMOJI_CHAT)
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 8, "logprobs": 3}
    if stream:
        _, events = env.http.events("/v1/completions", {**body, "stream": True})
        choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
        text = "".join(c["text"] for c in choices)
        logprobs = {k: [x for c in choices if c["logprobs"] for x in c["logprobs"][k]]
                    for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        status, _, resp = env.http.json("POST", "/v1/completions", body)
        assert status == 200, resp
        text, logprobs = resp["choices"][0]["text"], resp["choices"][0]["logprobs"]
    # 8 tokens: two whole stars and the first two tokens of a third, which has no text yet.
    assert text == STAR * 2 and len(logprobs["tokens"]) == 8
    assert logprobs["tokens"][:3] == ["\\xf0\\x9f", "\\x8c", "\\x9f"]
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(top) == 3 and top[token] == lp  # three distinct candidates, the sampled one among them
        assert not any("\ufffd" in key for key in top)
    # Each token starts where its character does, never past the returned text.
    assert logprobs["text_offset"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert all(offset <= len(text) for offset in logprobs["text_offset"])


@pytest.mark.parametrize("stream", [False, True])
def test_text_offsets_stop_at_the_text_a_stop_string_cut(env, stream):
    body = {"prompt": P, "temperature": 0, "max_tokens": 20, "stop": [", 8"], "logprobs": 0}
    if stream:
        _, events = env.http.events("/v1/completions", {**body, "stream": True})
        choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
        text = "".join(c["text"] for c in choices)
        offsets = [x for c in choices if c["logprobs"] for x in c["logprobs"]["text_offset"]]
    else:
        _, _, resp = env.http.json("POST", "/v1/completions", body)
        text, offsets = resp["choices"][0]["text"], resp["choices"][0]["logprobs"]["text_offset"]
    assert text == " 6, 7" and len(offsets) == 8  # ' ', '6', ',', ' ', '7', ',', ' ', '8'
    assert offsets == [0, 1, 2, 3, 4, 5, 5, 5]
