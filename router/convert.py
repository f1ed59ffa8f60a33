"""Client messages into the router's records: request ids, prompts as token ids, validated sampling parameters.

Every failure is a RouterError whose message names the field, as the Generation service promises.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from router.cache.semantic.query import SemanticQuery, from_proto as semantic_query_from_proto
from router.errors import RouterError
from router.model import ServedModel
from tandem.v1 import generation_pb2 as pb
from workers.sampling_params import SamplingParams
from workers.wire import sampling_params_from_proto

# A client's request id is echoed in gRPC metadata, HTTP headers and the workers' request ids: printable ASCII
# without spaces, bounded.
MAX_REQUEST_ID_LEN = 256
_REQUEST_ID = re.compile(r"[\x21-\x7e]+")
# The longest X-Request-Timeout, in seconds (~3 years): grpc turns a timeout of ~1e10 s into one that has
# already passed, for the router's worker calls as for any gRPC client.
MAX_TIMEOUT_S = 1e8


# OpenAI's message roles ("developer" is its newer name for "system"); the chat template renders them.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class GenerateInput:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int | None  # None: not sent (the tenant's priority applies)
    semantic: SemanticQuery | None = None  # the request opted in to the semantic cache (router/cache/semantic/)


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """`request_id` when it is safe to echo; INVALID_ARGUMENT naming `field` otherwise."""
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field}: must be at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}")
    if not _REQUEST_ID.fullmatch(request_id):
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{field}: must be printable ASCII without spaces (0x21-0x7e)")
    return request_id


def check_model(requested: str, model: ServedModel) -> None:
    if requested and requested != model.name:
        raise RouterError(grpc.StatusCode.NOT_FOUND, f"model: {requested!r} is not served here; this router serves {model.name!r}")


def check_known_fields(msg: Message, path: str = "") -> None:
    """INVALID_ARGUMENT naming any field this router does not know (a newer client's), in `msg` or the messages
    it holds; protobuf would otherwise drop it silently."""
    unknown = [f.field_number for f in UnknownFieldSet(msg)]
    if unknown:
        where = path or msg.DESCRIPTOR.full_name
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{where}: field number {unknown[0]} is unknown to this router "
                          f"({msg.DESCRIPTOR.full_name}); upgrade the router or leave the field unset")
    for desc, value in msg.ListFields():
        if desc.message_type is None or desc.message_type.GetOptions().map_entry:
            continue
        name = f"{path}.{desc.name}" if path else desc.name
        if desc.is_repeated:
            for i, item in enumerate(value):
                check_known_fields(item, f"{name}[{i}]")
        elif desc.message_type.full_name != "google.protobuf.Struct":
            check_known_fields(value, name)


def generate_input_from_proto(msg: pb.GenerateRequest, request_id: str, model: ServedModel,
                              tenant_id: str | None = None) -> GenerateInput:
    """`tenant_id`: the x-tenant-id metadata (the semantic cache's scope when auth is off)."""
    check_known_fields(msg)
    check_model(msg.model, model)
    try:
        params = sampling_params_from_proto(msg.sampling)
    except ValueError as e:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}") from None
    check_vocabulary(params, model, "sampling.")
    kind = msg.WhichOneof("input")
    if kind == "token_ids":
        prompt = list(msg.token_ids.ids)
        bad = next((t for t in prompt if t >= model.vocab_size), None)
        if bad is not None:
            raise RouterError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input: token id {bad} is out of the vocabulary (must be < {model.vocab_size})",
            )
    else:
        prompt = _encode(kind, msg, model)
    if not prompt:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, "input: the prompt is empty")
    semantic = None
    if msg.semantic_cache:
        messages = [{"role": m.role, "content": m.content} for m in msg.chat.messages] if kind == "chat" else None
        options = ([msg.chat.add_generation_prompt if msg.chat.HasField("add_generation_prompt") else None,
                    msg.chat.continue_final_message, json_format.MessageToDict(msg.chat.chat_template_kwargs)]
                   if kind == "chat" else None)
        semantic = semantic_query_from_proto(kind, msg.text if kind == "text" else None, messages, options, params,
                                             tenant_id)
    return GenerateInput(request_id=request_id, prompt_token_ids=prompt, params=params,
                         priority=msg.priority if msg.HasField("priority") else None, semantic=semantic)


def check_vocabulary(params: SamplingParams, model: ServedModel, prefix: str = "") -> None:
    """The token ids in `params` (logit_bias, stop_token_ids) are in the model's vocabulary; INVALID_ARGUMENT naming
    the field (after `prefix`: "sampling." on gRPC) otherwise."""
    for field, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        bad = next((t for t in ids if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{prefix}{field}: token id {bad} is out of the vocabulary (must be < {model.vocab_size})")


def prompt_from_tokenize_request(msg: pb.TokenizeRequest, model: ServedModel) -> list[int]:
    check_known_fields(msg)
    check_model(msg.model, model)
    return _encode(msg.WhichOneof("input"), msg, model)


def _encode(kind: str | None, msg: pb.GenerateRequest | pb.TokenizeRequest, model: ServedModel) -> list[int]:
    if kind is None:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, "input: must be set (text, token_ids or chat)")
    if kind == "text":
        return encode_prompt(lambda: model.encode_text(msg.text))
    chat = msg.chat
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"chat.messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r}")
    add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    kwargs = json_format.MessageToDict(chat.chat_template_kwargs) if chat.HasField("chat_template_kwargs") else None
    return encode_prompt(lambda: model.encode_chat(messages, add_generation_prompt, chat.continue_final_message,
                                                    kwargs), option_prefix="chat.", chat=True)


def encode_prompt(encode: Callable[[], list[int]], field: str = "input", option_prefix: str = "",
                  chat: bool = False) -> list[int]:
    """Run a tokenizer call (ServedModel.encode_text or encode_chat); a failure is INVALID_ARGUMENT naming
    `field`, the field of the client's API that held the prompt, or the chat option at fault (its name after
    `option_prefix`: "chat." on gRPC, where the options live in ChatMessages)."""
    try:
        return encode()
    except ValueError as e:
        message = str(e)
        if message.startswith(_CHAT_OPTIONS):
            message = option_prefix + message
        else:  # ServedModel's messages name the gRPC field ("input: ..."); name the caller's
            message = f"{field}: {message.removeprefix('input: ')}"
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, message) from None
    except Exception as e:  # a chat template may raise anything (jinja's TemplateError for an unsupported role)
        what = "the chat template failed" if chat else "could not be tokenized"
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {what}: {e}") from None


_CHAT_OPTIONS = ("continue_final_message:", "chat_template_kwargs:", "add_generation_prompt:")
