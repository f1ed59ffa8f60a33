"""Client messages into the router's records: request ids, prompts as token ids, validated sampling parameters.

Every failure is a RouterError whose message names the field, as the Generation service promises.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from router.errors import RouterError
from router.model import ServedModel
from tandem.v1 import generation_pb2 as pb
from workers.sampling_params import SamplingParams
from workers.wire import sampling_params_from_proto


@dataclass(frozen=True, slots=True)
class GenerateInput:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def check_model(requested: str, model: ServedModel) -> None:
    if requested and requested != model.name:
        raise RouterError(grpc.StatusCode.NOT_FOUND, f"model: {requested!r} is not served here; this router serves {model.name!r}")


def generate_input_from_proto(msg: pb.GenerateRequest, request_id: str, model: ServedModel) -> GenerateInput:
    check_model(msg.model, model)
    try:
        params = sampling_params_from_proto(msg.sampling)
    except ValueError as e:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
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
    return GenerateInput(request_id=request_id, prompt_token_ids=prompt, params=params, priority=msg.priority)


def prompt_from_tokenize_request(msg: pb.TokenizeRequest, model: ServedModel) -> list[int]:
    check_model(msg.model, model)
    return _encode(msg.WhichOneof("input"), msg, model)


def _encode(kind: str | None, msg: pb.GenerateRequest | pb.TokenizeRequest, model: ServedModel) -> list[int]:
    if kind is None:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, "input: must be set (text, token_ids or chat)")
    if kind == "text":
        return encode_prompt(lambda: model.encode_text(msg.text))
    messages = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
    for i, m in enumerate(messages):
        if not m["role"]:
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"input: chat.messages[{i}].role must be set")
    return encode_prompt(lambda: model.encode_chat(messages))


def encode_prompt(encode: Callable[[], list[int]], field: str = "input") -> list[int]:
    """Run a tokenizer call (ServedModel.encode_text or encode_chat); a failure is INVALID_ARGUMENT naming
    `field`, the field of the client's API that held the prompt."""
    try:
        return encode()
    except ValueError as e:
        # ServedModel's messages name the gRPC field ("input: ..."); name the caller's.
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {str(e).removeprefix('input: ')}") from None
    except Exception as e:  # a chat template may raise anything (jinja's TemplateError for an unsupported role)
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: the chat template failed: {e}") from None
