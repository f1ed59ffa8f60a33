"""OpenAI's completions and chat completions as the router's records, with vLLM's extra sampling fields.

Request JSON -> `OpenAIRequest` (a GenerateInput plus how to answer), and the GenerateResponse messages of a
GenerateCall -> OpenAI JSON: one whole response, or the chunks of an SSE stream. No HTTP here (router/http_server.py
serves it). Every failure is a RouterError whose message names the request field, as the gRPC path's do.
"""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from router.cache.semantic import query as semantic
from router.convert import CHAT_ROLES, GenerateInput, check_model, check_vocabulary, encode_prompt
from router.errors import RouterError
from router.model import ServedModel
from router.token_bytes import TextOffsets, token_str
from tandem.v1 import generation_pb2 as pb
from workers.sampling_params import MAX_NUM_LOGPROBS, SamplingParams
from workers.wire import check_fits_proto

COMPLETION = "text_completion"
CHAT = "chat"
# OpenAI's default for completions; chat completions default to the rest of the model's context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# JSON has no -inf; vLLM reports this floor instead.
MIN_LOGPROB = -9999.0

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# The error "type" per HTTP status, as vLLM's OpenAI server names them.
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
               405: "MethodNotAllowed", 413: "BadRequestError", 429: "RateLimitError", 503: "ServiceUnavailableError",
               504: "TimeoutError", 500: "InternalServerError"}
# A message that starts with the field it is about: "messages[0].content[1].type: ...".
_PARAM = re.compile(r"([A-Za-z_][\w.\[\]-]*): ")
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}

# Plain keyword arguments of SamplingParams, each read from the same-named request field.
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_INT_FIELDS = ("n", "top_k", "seed", "min_tokens")
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output")
# Every field each endpoint understands; any other (not null) is a 400 naming it, never silently ignored.
# Some are honoured only at their default value (echo: false, best_of: 1, suffix: "", response_format text,
# no tools); other values are refused by name. `user` is refused: tandem keeps no per-user records.
_COMMON_FIELDS = frozenset({
    "model", "stream", "stream_options", "max_tokens", "logprobs", "stop", "stop_token_ids", "logit_bias", "priority",
    semantic.FIELD,
    *_FLOAT_FIELDS, *_INT_FIELDS, *_BOOL_FIELDS})
FIELDS = {
    COMPLETION: _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"},
    CHAT: _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt",
                            "continue_final_message", "chat_template_kwargs", "response_format", "tools", "tool_choice"},
}
_MESSAGE_FIELDS = frozenset({"role", "content"})
_TEXT_PART_FIELDS = frozenset({"type", "text"})
_STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})
_INT32 = (-(1 << 31), (1 << 31) - 1)


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """One parsed completions or chat completions request."""

    operation: str  # COMPLETION or CHAT (gen_ai.operation.name)
    inp: GenerateInput
    stream: bool
    # stream_options.include_usage: every chunk carries "usage": null and a last chunk carries the usage.
    include_usage: bool
    # stream_options.continuous_usage_stats (vLLM's): every chunk carries the usage so far (guidellm asks for it).
    continuous_usage: bool
    # Top logprobs per token to report (completions' `logprobs`, chat's `top_logprobs`); None: no logprobs.
    num_logprobs: int | None


def new_response_id(operation: str) -> str:
    return f"{'chatcmpl' if operation == CHAT else 'cmpl'}-{uuid.uuid4().hex}"


def bad_request(message: str) -> RouterError:
    return RouterError(grpc.StatusCode.INVALID_ARGUMENT, message)


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(status: int, message: str) -> dict:
    """OpenAI's error object; a 400's `param` is the field its message starts with ("max_tokens: must be >= 1").
    Any 4xx is typed as a client error."""
    match = _PARAM.match(message) if status == 400 else None
    default_type = "BadRequestError" if 400 <= status < 500 else "InternalServerError"
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, default_type),
                      "param": match[1] if match else None, "code": status}}


def router_error_body(e: RouterError, operation: str) -> tuple[int, dict]:
    """The HTTP status and error body for a RouterError of this request."""
    message = e.message
    if message.startswith("input: "):  # the router's request path names the gRPC field
        message = ("messages" if operation == CHAT else "prompt") + message.removeprefix("input")
    status = http_status(e.code)
    return status, error_body(status, message)


# --- requests -----------------------------------------------------------------------------------------------

def parse_request(body: object, operation: str, request_id: str, model: ServedModel,
                  max_model_len: int | None, headers: Mapping[str, str] | None = None) -> OpenAIRequest:
    """Validate a request body; `max_model_len` (the live workers' smallest context, None without any) bounds a
    chat completion's default max_tokens. `headers`: the semantic cache's opt-in and tenant headers."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}")
    _check_known(body, FIELDS[operation], "")
    check_model(_get(body, "model", str, "a string") or "", model)
    if operation == CHAT:
        _check_chat_only_defaults(body)
        prompt = _chat_prompt(body, model)
    else:
        if _get(body, "echo", bool, "a boolean"):
            raise bad_request("echo: true is not supported")
        best_of = _get(body, "best_of", _is_int, "an integer")
        if best_of is not None and best_of != 1:
            raise bad_request(f"best_of: only 1 is supported (one sequence per request), got {best_of}")
        if _get(body, "suffix", str, "a string"):
            raise bad_request("suffix: is not supported (no fill-in-the-middle); leave it unset")
        prompt = _completion_prompt(body, model)

    kwargs: dict = {}
    for name in _FLOAT_FIELDS:
        kwargs[name] = _get(body, name, _is_number, "a number")
    for name in _INT_FIELDS:
        kwargs[name] = _get(body, name, _is_int, "an integer")
    for name in _BOOL_FIELDS:
        kwargs[name] = _get(body, name, bool, "a boolean")
    kwargs["stop"] = _stop(body)
    stop_token_ids = _get(body, "stop_token_ids", list, "a list of integers")
    if stop_token_ids is not None and not all(_is_int(t) for t in stop_token_ids):
        raise bad_request("stop_token_ids: must be a list of integers")
    kwargs["stop_token_ids"] = stop_token_ids
    kwargs["logit_bias"] = _logit_bias(body, model)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    max_tokens = _get(body, "max_completion_tokens", _is_int, "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", _is_int, "an integer")
    sent_max_tokens = max_tokens
    if max_tokens is None:
        if operation == CHAT and max_model_len:
            # The wire has no "up to the context": ask for the rest of it (a prompt too long fails later).
            max_tokens = max(max_model_len - len(prompt), 1)
        else:
            max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    num_logprobs = _logprobs(body, operation)
    try:
        params = SamplingParams(max_tokens=max_tokens, logprobs=num_logprobs, **kwargs)
        check_fits_proto(params)
    except ValueError as e:
        message = str(e)
        if message.startswith("max_tokens:") and "max_completion_tokens" in body:
            message = "max_completion_tokens:" + message.removeprefix("max_tokens:")
        raise bad_request(message) from None
    check_vocabulary(params, model)

    stream = bool(_get(body, "stream", bool, "a boolean"))
    stream_options = _get(body, "stream_options", dict, "an object") or {}
    if stream_options and not stream:
        raise bad_request("stream_options: only allowed when stream is true")
    _check_known(stream_options, _STREAM_OPTIONS, "stream_options.")
    include_usage = bool(_get(stream_options, "include_usage", bool, "a boolean", "stream_options.include_usage"))
    continuous_usage = bool(_get(stream_options, "continuous_usage_stats", bool, "a boolean",
                                 "stream_options.continuous_usage_stats"))
    priority = _get(body, "priority", _is_int, "an integer")
    if priority is not None and not _INT32[0] <= priority <= _INT32[1]:
        raise bad_request(f"priority: must be in [{_INT32[0]}, {_INT32[1]}], got {priority}")
    headers = headers or {}
    keyed_max_tokens = params.max_tokens if operation == COMPLETION else sent_max_tokens  # chat's default varies
    query = semantic.from_openai(body, operation, params, keyed_max_tokens, headers.get(semantic.OPT_IN_HEADER),
                                 headers.get(semantic.TENANT_HEADER))
    inp = GenerateInput(request_id=request_id, prompt_token_ids=prompt, params=params, priority=priority,
                        semantic=query)
    return OpenAIRequest(operation=operation, inp=inp, stream=stream, include_usage=stream and include_usage,
                         continuous_usage=stream and include_usage and continuous_usage, num_logprobs=num_logprobs)


def _check_known(obj: dict, known: frozenset, prefix: str) -> None:
    """A 400 naming the first field outside `known` that holds a value (null means unset, as OpenAI's SDK
    and vLLM treat it)."""
    unknown = sorted(k for k, v in obj.items() if k not in known and v is not None)
    if unknown:
        raise bad_request(f"{prefix}{unknown[0]}: unknown field; it is not served here (supported: "
                          f"{', '.join(sorted(known))})")


def _check_chat_only_defaults(body: dict) -> None:
    """Chat fields honoured at their default value only: anything else is refused by name."""
    response_format = _get(body, "response_format", dict, "an object")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_request(f"response_format: only {{\"type\": \"text\"}} is supported (no guided decoding), "
                          f"got type {response_format.get('type')!r}")
    tools = _get(body, "tools", list, "a list")
    if tools:
        raise bad_request("tools: tool calling is not supported; leave tools unset")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and tool_choice not in ("none", "auto"):
        raise bad_request(f"tool_choice: only 'none' or 'auto' is supported (no tools), got {tool_choice!r}")


def _logit_bias(body: dict, model: ServedModel) -> dict[int, float] | None:
    """OpenAI's {"token id": bias}; ids must be in the vocabulary (SamplingParams bounds the biases)."""
    bias = _get(body, "logit_bias", dict, "an object of token id to bias")
    if bias is None:
        return None
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or not int(key) < model.vocab_size:
            raise bad_request(f"logit_bias: keys must be token ids in [0, {model.vocab_size}), got {key!r}")
        if not _is_number(value):
            raise bad_request(f"logit_bias[{key}]: must be a number in [-100, 100], got {_json_type(value)}")
        out[int(key)] = value
    return out


def _completion_prompt(body: dict, model: ServedModel) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("prompt: is required (a string or a list of token ids)")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt: must not be empty")
        return _encode(lambda: model.encode_text(prompt), "prompt")
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise bad_request(f"prompt: a batch of {len(prompt)} prompts is not supported; send one prompt per "
                              "request")
        if not prompt:
            raise bad_request("prompt: must not be empty")
        for t in prompt:
            if not _is_int(t) or not 0 <= t < model.vocab_size:
                raise bad_request(f"prompt: token ids must be integers in [0, {model.vocab_size}), got {t!r}")
        return list(prompt)
    raise bad_request(f"prompt: must be a string or a list of token ids, got {_json_type(prompt)}")


def _chat_prompt(body: dict, model: ServedModel) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty list of {role, content} objects")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}]: must be an object, got {_json_type(m)}")
        _check_known(m, _MESSAGE_FIELDS, f"messages[{i}].")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if m.get("content") is None and role != "assistant":  # OpenAI's null content is an assistant's only
            raise bad_request(f"messages[{i}].content: is required for role {role!r}")
        rendered.append({"role": role, "content": _content(m.get("content"), f"messages[{i}].content")})
    add_generation_prompt = _get(body, "add_generation_prompt", bool, "a boolean")
    continue_final_message = bool(_get(body, "continue_final_message", bool, "a boolean"))
    kwargs = _get(body, "chat_template_kwargs", dict, "an object")
    return _encode(lambda: model.encode_chat(rendered, True if add_generation_prompt is None else add_generation_prompt,
                                             continue_final_message, kwargs), "messages")


def _content(content: object, field: str) -> str:
    """A message's text: a string, or text parts joined by newlines (as vLLM does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{field}: must be a string or a list of text parts, got {_json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise bad_request(f"{field}[{j}].type: must be 'text' (the only part type served), got {kind!r}")
        _check_known(part, _TEXT_PART_FIELDS, f"{field}[{j}].")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{field}[{j}].text: must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _encode(encode: Callable[[], list[int]], field: str) -> list[int]:
    ids = encode_prompt(encode, field, chat=field == "messages")
    if not ids:
        raise bad_request(f"{field}: the prompt is empty")
    return ids


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return [stop] if stop else None
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise bad_request(f"stop: must be a string or a list of strings, got {_json_type(stop)}")


def _logprobs(body: dict, operation: str) -> int | None:
    if operation == COMPLETION:
        return _get(body, "logprobs", _is_int, f"an integer in [0, {MAX_NUM_LOGPROBS}]")
    wanted = _get(body, "logprobs", bool, "a boolean")
    top = _get(body, "top_logprobs", _is_int, f"an integer in [0, {MAX_NUM_LOGPROBS}]")
    if top is not None and not 0 <= top <= MAX_NUM_LOGPROBS:
        raise bad_request(f"top_logprobs: must be in [0, {MAX_NUM_LOGPROBS}], got {top}")
    if top and not wanted:
        raise bad_request("top_logprobs: needs logprobs: true")
    return (top or 0) if wanted else None


def _get(body: dict, name: str, check, what: str, field: str | None = None):
    """body[name], None when absent or null; a wrong type is a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, check) if isinstance(check, type) else check(value)
    if not ok:
        raise bad_request(f"{field or name}: must be {what}, got {_json_type(value)}")
    return value


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _json_type(x: object) -> str:
    if x is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(x), type(x).__name__)


# --- responses ----------------------------------------------------------------------------------------------

class ResponseBuilder:
    """Turns one request's Chunk and Complete messages into OpenAI JSON.

    Streaming: `choice(chunk)` per chunk, `finish(complete)` at the end, `stream_chunk(...)` wraps them.
    Otherwise the same calls accumulate and `response()` builds the whole body.
    """

    def __init__(self, req: OpenAIRequest, response_id: str, model: ServedModel):
        self.req = req
        self.chat = req.operation == CHAT
        self.response_id = response_id
        self.model_name = model.name
        self.created = int(time.time())
        self._token_bytes = model.token_bytes
        self._texts: list[str] = []
        self._num_chars = 0  # of text returned so far
        self._logprobs: dict = {"content": []} if self.chat else {
            "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        # Completions' text_offset: where each token's text starts in the returned text.
        self._offsets = (TextOffsets(self._token_bytes, req.inp.params.skip_special_tokens)
                         if self._token_bytes is not None else None)
        # Streamed completions: entries of tokens whose text is still held back (a stop string may cut it), sent
        # once the text reaches them, or with the last chunk; and the newest chunk's logprobs.
        self._pending: dict[str, list] = {key: [] for key in self._logprobs}
        self._last_logprobs: dict | None = None
        self.usage: dict | None = None
        self.finish_reason: str | None = None

    # The pieces.

    def choice(self, chunk: pb.Chunk) -> dict | None:
        """The choice of a stream chunk with this chunk's text and logprobs; None when it has nothing to show."""
        self._texts.append(chunk.text)
        self._num_chars += len(chunk.text)
        logprobs = self._render_logprobs(chunk.logprobs) if self.req.num_logprobs is not None else None
        self.usage = _usage(chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens)
        self._last_logprobs = None
        if not chunk.text and not (logprobs and any(logprobs.values())):
            return None
        self._last_logprobs = logprobs
        if self.chat:
            return {"index": 0, "delta": {"content": chunk.text}, "logprobs": logprobs, "finish_reason": None}
        return {"index": 0, "text": chunk.text, "logprobs": logprobs, "finish_reason": None}

    def empty_choice(self) -> dict:
        if self.chat:
            return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}
        # After finish(): logprobs of the last tokens, when no chunk is left to carry them.
        logprobs = self._last_logprobs if self._last_logprobs and any(self._last_logprobs.values()) else None
        return {"index": 0, "text": "", "logprobs": logprobs, "finish_reason": None}

    def role_choice(self) -> dict:
        """Chat streams open with the assistant's role."""
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def finish(self, complete: pb.Complete) -> str:
        """The OpenAI finish_reason; a request that ended in an error raises it."""
        reason = FINISH_REASONS.get(complete.finish_reason)
        if reason is None:
            detail = complete.error_message or pb.FinishReason.Name(complete.finish_reason)
            raise RouterError(grpc.StatusCode.INTERNAL, f"the request failed: {detail}")
        u = complete.usage
        self.usage = _usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        if self.req.inp.semantic is not None:  # opted in: say whether the semantic cache answered
            self.usage["semantic_cache_hit"] = u.semantic_cache_hit
        self.finish_reason = reason
        if not self.chat and self.req.num_logprobs is not None:
            self._flush_pending()
        return reason

    # The JSON objects.

    def stream_chunk(self, choice: dict | None) -> dict:
        """One SSE chunk; `choice` None makes the include_usage chunk (no choices, the usage)."""
        body = {"id": self.response_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [choice] if choice else []}
        if self.req.include_usage:
            body["usage"] = self.usage if not choice or self.req.continuous_usage else None
        return body

    def response(self) -> dict:
        text = "".join(self._texts)
        logprobs = self._logprobs if self.req.num_logprobs is not None else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return {"id": self.response_id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model_name, "choices": [choice], "usage": self.usage}

    # Logprobs, in each endpoint's format; also accumulated for response(). A token that holds part of a UTF-8
    # character keeps its own bytes (`bytes`, and a `\\xNN`-escaped string), so candidates never collapse into one
    # "\ufffd" and the bytes of a character's tokens concatenate to it (router/token_bytes.py).

    def _render_logprobs(self, entries) -> dict:
        n = self.req.num_logprobs
        if self.chat:
            content = []
            for e in entries:
                top = sorted(e.top_logprobs, key=lambda t: -t.logprob)
                seen, tops = set(), []
                for t in top:
                    if t.token_id not in seen and len(tops) < n:
                        seen.add(t.token_id)
                        tops.append(self._chat_logprob(t.token_id, t.logprob))
                content.append({**self._chat_logprob(e.token_id, e.logprob), "top_logprobs": tops})
            self._logprobs["content"].extend(content)
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            token = self._token(e.token_id)
            # Like vLLM: the top-n and the sampled token itself; one key per token id, even when two tokens
            # render alike (the later one then goes by vLLM's "token_id:N").
            top: dict[str, float] = {}
            key_ids: dict[str, int] = {}
            for t in sorted(e.top_logprobs, key=lambda t: (t.token_id != e.token_id, -t.logprob)):
                key = self._token(t.token_id)
                if key_ids.setdefault(key, t.token_id) != t.token_id:
                    key = f"token_id:{t.token_id}"
                top.setdefault(key, _logprob(t.logprob))
            top.setdefault(token, _logprob(e.logprob))
            out["tokens"].append(token)
            out["token_logprobs"].append(_logprob(e.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offsets.add(e.token_id) if self._offsets is not None
                                      else self._num_chars)
        for key, values in out.items():
            self._logprobs[key].extend(values)
        if not self.req.stream:
            return out
        # Release the entries whose text the client has; hold the rest (their offsets may still be cut).
        for key, values in out.items():
            self._pending[key].extend(values)
        # An offset within the text sent so far can never point past the final text.
        offsets = self._pending["text_offset"]
        num_ready = next((i for i, offset in enumerate(offsets) if offset > self._num_chars), len(offsets))
        ready = {key: values[:num_ready] for key, values in self._pending.items()}
        self._pending = {key: values[num_ready:] for key, values in self._pending.items()}
        return ready

    def _flush_pending(self) -> None:
        """At the end: no text_offset points past the returned text (a stop string or stop token cut it), and a
        stream's held entries go out with its last chunk."""
        for offsets in (self._logprobs["text_offset"], self._pending["text_offset"]):
            offsets[:] = [min(offset, self._num_chars) for offset in offsets]
        if not self.req.stream or not self._pending["tokens"]:
            return
        if self._last_logprobs is None:
            self._last_logprobs = {key: [] for key in self._pending}
        for key, values in self._pending.items():
            self._last_logprobs[key].extend(values)
            values.clear()

    def _token(self, token_id: int) -> str:
        if self._token_bytes is None:
            return f"token_id:{token_id}"  # vLLM's return_tokens_as_token_ids form, for tokenizer-less models
        return token_str(self._token_bytes(token_id))

    def _chat_logprob(self, token_id: int, logprob: float) -> dict:
        if self._token_bytes is None:
            token = f"token_id:{token_id}"
            return {"token": token, "logprob": _logprob(logprob), "bytes": list(token.encode("utf-8"))}
        data = self._token_bytes(token_id)
        return {"token": token_str(data), "logprob": _logprob(logprob), "bytes": list(data)}


def _logprob(x: float) -> float:
    return max(float(x), MIN_LOGPROB)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
