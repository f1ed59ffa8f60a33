"""The router's OpenAI-compatible HTTP front against fake workers, over real sockets with http.client: the
completions and chat formats, SSE streams, errors and their statuses, /health, /metrics, /v1/models, draining
and disconnects."""
from __future__ import annotations

import http.client
import json
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.router.conftest import wait_for
from tests.router.helpers import LONG_TEXT

CHAT = [{"role": "user", "content": "Tell me about foxes."}]


class HTTPClient:
    """One keep-alive connection to the router's HTTP port."""

    def __init__(self, address: str, timeout_s: float = 10.0):
        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None,
                raw: bytes | None = None) -> http.client.HTTPResponse:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        self.conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        return self.conn.getresponse()

    def json(self, method: str, path: str, body: object = None, **kw) -> tuple[int, dict, dict]:
        resp = self.request(method, path, body, **kw)
        data = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(data) if data else {}

    def events(self, path: str, body: dict, **kw) -> tuple[http.client.HTTPResponse, list]:
        """POST a streaming request; the SSE events' data, JSON decoded ("[DONE]" kept as is)."""
        resp = self.request("POST", path, body, **kw)
        return resp, list(read_events(resp))

    def close(self) -> None:
        self.conn.close()


def read_events(resp: http.client.HTTPResponse):
    """Yields each event's data; asserts the framing: one `data: ...` line, then a blank line."""
    while True:
        line = resp.readline()
        if not line:
            return
        assert line.startswith(b"data: ") and line.endswith(b"\n"), line
        assert resp.readline() == b"\n"
        data = line[len(b"data: "):-1].decode()
        yield data if data == "[DONE]" else json.loads(data)
        if data == "[DONE]":
            return


@pytest.fixture
def http_env(make_env):
    clients: list[HTTPClient] = []

    def make(**kw):
        env = make_env(http_port=0, **kw)
        client = HTTPClient(env.router.http_address)
        clients.append(client)
        env.http = client
        env.new_client = lambda: clients.append(HTTPClient(env.router.http_address)) or clients[-1]
        return env

    yield make
    for c in clients:
        c.close()


def decoded(model, ids: list[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def completion(**kw) -> dict:
    return {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": LONG_TEXT, "temperature": 0, **kw}


def chat(**kw) -> dict:
    return {"messages": CHAT, "temperature": 0, **kw}


# --- completions and chat --------------------------------------------------------------------------------------

def test_completion_text_usage_and_request_id(http_env, script):
    env = http_env()
    status, headers, body = env.http.json("POST", "/v1/completions", completion(max_tokens=10),
                                          headers={"X-Request-Id": "my-req"})
    assert status == 200, body
    prompt_len = len(env.model.encode_text(LONG_TEXT))
    assert body["id"] == headers["X-Request-Id"] == "my-req"
    assert (body["object"], body["model"]) == ("text_completion", env.model.name)
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": decoded(env.model, script[:10]), "logprobs": None, "finish_reason": "length"}
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 10, "total_tokens": prompt_len + 10,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    # The request id reaches the workers.
    [decode] = env.by_role("decode")
    assert decode.decodes[0].request.request_id.startswith("my-req-")


def test_completion_of_token_ids_and_generated_ids(http_env, script):
    env = http_env()
    status, headers, body = env.http.json("POST", "/v1/completions", completion(prompt=[[1, 2, 3, 4, 5]], max_tokens=4))
    assert status == 200, body
    assert body["id"].startswith("cmpl-") and headers["X-Request-Id"] == body["id"]
    assert body["usage"]["prompt_tokens"] == 5
    [prefill] = env.by_role("prefill")
    assert list(prefill.prefills[0].request.prompt_token_ids) == [1, 2, 3, 4, 5]


def test_chat_completion_runs_to_eos_with_the_chat_template(http_env, script):
    env = http_env()
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    status, _, body = env.http.json("POST", "/v1/chat/completions",
                                    chat(messages=[system, *CHAT], max_completion_tokens=500))
    assert status == 200, body
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": decoded(env.model, script)},
                      "logprobs": None, "finish_reason": "stop"}
    expected = env.model.encode_chat([{"role": "system", "content": "Be brief."}, *CHAT])
    [prefill] = env.by_role("prefill")
    assert list(prefill.prefills[0].request.prompt_token_ids) == expected
    assert body["usage"]["completion_tokens"] == len(script)


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(http_env, script):
    env = http_env()
    status, _, body = env.http.json("POST", "/v1/chat/completions", chat())
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"  # the whole script, not 16 tokens
    [prefill] = env.by_role("prefill")
    prompt_len = len(prefill.prefills[0].request.prompt_token_ids)
    assert prefill.prefills[0].request.sampling.max_tokens == 512 - prompt_len


def test_stop_strings(http_env):
    env = http_env()
    _, _, body = env.http.json("POST", "/v1/completions", completion(max_tokens=30, stop="fox"))
    assert body["choices"][0]["text"] == " The quick brown " and body["choices"][0]["finish_reason"] == "stop"
    _, _, body = env.http.json("POST", "/v1/completions", completion(max_tokens=30, stop=["lazy", "fox"],
                                                                     include_stop_str_in_output=True))
    assert body["choices"][0]["text"] == " The quick brown fox"


# --- streams -------------------------------------------------------------------------------------------------

def test_completion_stream_with_usage(http_env, script):
    env = http_env()
    _, _, whole = env.http.json("POST", "/v1/completions", completion(max_tokens=8))
    resp, events = env.http.events("/v1/completions", completion(max_tokens=8, stream=True,
                                                                 stream_options={"include_usage": True}))
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert len(chunks) == 8  # one per token: the finish_reason rides on the last one
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(http_env):
    env = http_env()
    options = {"include_usage": True, "continuous_usage_stats": True}
    _, events = env.http.events("/v1/completions", completion(max_tokens=8, stream=True, stream_options=options))
    *chunks, usage_chunk, _ = events
    assert [c["usage"]["completion_tokens"] for c in chunks] == list(range(1, 9))
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 8


def test_chat_stream_starts_with_the_role(http_env, script):
    env = http_env()
    [decode] = env.by_role("decode")
    decode.tokens_per_message = 3
    resp, events = env.http.events("/v1/chat/completions", chat(max_tokens=10, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == decoded(env.model, script[:10])


def test_disconnect_mid_stream_aborts_on_the_worker(http_env):
    env = http_env()
    [decode] = env.by_role("decode")
    decode.token_delay_s = 0.05
    resp = env.http.request("POST", "/v1/chat/completions", chat(max_tokens=200, stream=True))
    events = read_events(resp)
    [next(events) for _ in range(3)]
    env.http.close()
    wait_for(lambda: decode.decodes and decode.decodes[0].request.request_id in decode.aborted,
             what="the decode aborted on the worker")
    assert decode.cancelled == [decode.decodes[0].request.request_id]
    wait_for(lambda: env.router.num_active == 0, what="the request to end")


# --- logprobs ------------------------------------------------------------------------------------------------

def test_completion_logprobs(http_env, script):
    env = http_env()
    _, _, body = env.http.json("POST", "/v1/completions", completion(max_tokens=4, logprobs=2))
    [choice] = body["choices"]
    lp = choice["logprobs"]
    tokens = [env.model.tokenizer.decode([t]) for t in script[:4]]
    assert lp["tokens"] == tokens and "".join(tokens) == choice["text"]
    assert lp["token_logprobs"] == [-0.25] * 4
    assert lp["top_logprobs"] == [{t: -0.25} for t in tokens]
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(4)]


def test_chat_logprobs_stream(http_env, script):
    env = http_env()
    _, events = env.http.events("/v1/chat/completions", chat(max_tokens=3, logprobs=True, top_logprobs=1,
                                                             stream=True))
    content = [entry for c in events[1:-1] for entry in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    tokens = [env.model.tokenizer.decode([t]) for t in script[:3]]
    assert content == [{"token": t, "logprob": -0.25, "bytes": list(t.encode()),
                        "top_logprobs": [{"token": t, "logprob": -0.25, "bytes": list(t.encode())}]} for t in tokens]


# --- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", completion(max_tokens=0), "max_tokens"),
    ("/v1/completions", completion(temperature="hot"), "temperature"),
    ("/v1/completions", completion(prompt=["one", "two"]), "prompt"),
    ("/v1/completions", completion(prompt=[]), "prompt"),
    ("/v1/completions", completion(prompt=list(range(600))), "prompt"),  # longer than max_model_len=512
    ("/v1/completions", completion(echo=True), "echo"),
    ("/v1/completions", completion(n=2), "n"),
    ("/v1/completions", completion(stream="yes"), "stream"),
    ("/v1/completions", completion(stop=[1]), "stop"),
    ("/v1/completions", completion(logprobs=True), "logprobs"),
    ("/v1/completions", {"temperature": 0}, "prompt"),
    ("/v1/chat/completions", chat(top_p=0), "top_p"),
    ("/v1/chat/completions", chat(messages=[]), "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages[0].content[0].type"),
    ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs"),
])
def test_bad_requests_name_the_field(http_env, path, body, param):
    env = http_env()
    status, headers, err = env.http.json("POST", path, body)
    assert status == 400, err
    assert err["error"]["param"] == param and err["error"]["message"].startswith(f"{param}: ")
    assert err["error"]["type"] == "BadRequestError" and err["error"]["code"] == 400
    assert headers["X-Request-Id"]
    # The connection and the server carry on.
    status, _, ok = env.http.json("POST", path, chat(max_tokens=2) if "chat" in path else completion(max_tokens=2))
    assert status == 200, ok


def test_protocol_errors(http_env):
    env = http_env()
    cases = [
        (env.http.json("POST", "/v1/completions", raw=b"{not json"), 400, "not valid JSON"),
        (env.http.json("POST", "/v1/completions", raw=b"[1, 2]"), 400, "must be a JSON object"),
        (env.http.json("POST", "/v1/completions", completion(model="gpt-4")), 404, "model: 'gpt-4' is not served"),
        (env.http.json("POST", "/v1/embeddings", {}), 404, "Not Found"),
        (env.http.json("GET", "/v1/completions"), 405, "allowed: POST"),
        (env.http.json("POST", "/v1/completions", completion(), headers={"X-Request-Timeout": "soon"}), 400,
         "X-Request-Timeout"),
    ]
    for (status, _, body), expected_status, text in cases:
        assert status == expected_status and text in body["error"]["message"], body
        assert body["error"]["code"] == expected_status


def test_admission_full_is_429_and_a_dropped_client_is_aborted(http_env):
    env = http_env(max_queued_requests=1)
    [prefill] = env.by_role("prefill")
    prefill.prefill_delay_s = 60
    first = env.new_client()
    waiting = threading.Thread(target=lambda: pytest.raises(OSError, first.json, "POST", "/v1/completions",
                                                            completion()), daemon=True)
    waiting.start()
    wait_for(lambda: env.router.admission.num_queued("prefill") == 1, what="the first request queued")
    status, _, body = env.http.json("POST", "/v1/completions", completion())
    assert status == 429 and body["error"]["type"] == "RateLimitError" and "max_queued_requests=1" in body[
        "error"]["message"]
    # A non-streaming client that goes away cancels its request: the prefill is cancelled and aborted.
    first.conn.sock.shutdown(2)
    wait_for(lambda: prefill.cancelled and prefill.cancelled[0] in prefill.aborted, what="the prefill aborted")
    wait_for(lambda: env.router.admission.num_queued("prefill") == 0, what="the queue slot released")


def test_deadline_header_is_504(http_env):
    env = http_env()
    [prefill] = env.by_role("prefill")
    prefill.prefill_delay_s = 30
    status, _, body = env.http.json("POST", "/v1/completions", completion(), headers={"X-Request-Timeout": "0.2"})
    assert status == 504 and "deadline" in body["error"]["message"]


def test_no_workers_is_503(http_env):
    env = http_env(prefill=0, decode=0, wait_ready=False)
    status, _, body = env.http.json("POST", "/v1/chat/completions", chat())
    assert status == 503 and "no live worker" in body["error"]["message"]
    status, _, body = env.http.json("GET", "/health")
    assert status == 503 and "prefill, decode pool" in body["error"]["message"]


def test_kv_load_failure_with_policy_fail_is_503(http_env):
    env = http_env(kv_load_failure_policy="fail")
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    decode.kv_error = True
    status, _, body = env.http.json("POST", "/v1/completions", completion())
    assert status == 503 and body["error"]["type"] == "ServiceUnavailableError"
    message = body["error"]["message"]
    assert message.startswith(f"KV hand-off failed: decode worker {decode.worker_id} could not load the KV from "
                              f"prefill worker {prefill.worker_id}: kv: ")
    assert message.endswith("(kv_load_failure_policy=fail)")
    wait_for(lambda: not prefill.held, what="the held KV released")


# --- the other endpoints and the lifecycle -------------------------------------------------------------------

def test_health_models_and_metrics(http_env):
    env = http_env()
    status, _, _ = env.http.json("GET", "/health")
    assert status == 200
    status, _, models = env.http.json("GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    [card] = models["data"]
    assert (card["id"], card["object"], card["max_model_len"], card["owned_by"]) == (
        env.model.name, "model", 512, "tandem")
    env.http.json("POST", "/v1/completions", completion(max_tokens=2))
    resp = env.http.request("GET", "/metrics")
    text = resp.read().decode()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    list(text_string_to_metric_families(text))  # parses as the Prometheus text format


def test_draining_refuses_new_requests_and_finishes_running_streams(http_env, script):
    env = http_env()
    [decode] = env.by_role("decode")
    decode.token_delay_s = 0.02
    resp = env.new_client().request("POST", "/v1/completions", completion(max_tokens=12, stream=True))
    events = read_events(resp)
    first = next(events)
    stopping = env.aio.submit(env.router.stop(grace_s=10))
    wait_for(lambda: env.router.draining, what="draining")
    status, _, body = env.http.json("POST", "/v1/completions", completion())
    assert status == 503 and body["error"]["message"] == "router is draining"
    assert env.http.json("GET", "/health")[0] == 503
    rest = list(events)
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in [first, *rest[:-1]]) == decoded(env.model, script[:12])
    stopping.result(timeout=10)


def test_http_port_off(make_env):
    env = make_env(http_port=-1)
    assert env.router.http_address is None


def test_http_port_option_is_validated():
    from router.__main__ import parse_config
    from router.config import RouterConfig

    config, _ = parse_config(["--registry", "127.0.0.1:1", "--http-port", "0"])
    assert config.http_port == 0 and RouterConfig(registry_address="127.0.0.1:1").http_port == 8000
    for bad in (-2, 70000):
        with pytest.raises(ValueError, match=r"^http_port: must be in \[0, 65535\]"):
            RouterConfig(registry_address="127.0.0.1:1", http_port=bad)
    with pytest.raises(ValueError, match="^http_port: must differ from port"):
        RouterConfig(registry_address="127.0.0.1:1", port=9000, http_port=9000)


def test_a_taken_http_port_fails_start_naming_it(http_env, aio, served_model):
    from router import Router, RouterConfig

    env = http_env()
    taken = int(env.router.http_address.rsplit(":", 1)[1])
    router = Router(RouterConfig(port=0, http_port=taken, registry_address=env.registry.address), model=served_model)
    with pytest.raises(RuntimeError, match=f"^http_port: could not bind 127.0.0.1:{taken}"):
        aio.run(router.start())


def test_a_bug_fails_only_its_request(http_env, monkeypatch):
    from router.openai_api import ResponseBuilder

    env = http_env()
    monkeypatch.setattr(ResponseBuilder, "response", lambda self: 1 / 0)
    status, _, body = env.http.json("POST", "/v1/completions", completion(max_tokens=2))
    assert status == 500 and "ZeroDivisionError" in body["error"]["message"]
    monkeypatch.undo()
    assert env.new_client().json("POST", "/v1/completions", completion(max_tokens=2))[0] == 200
