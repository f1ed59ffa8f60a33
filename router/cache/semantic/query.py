"""What a request asks of the semantic cache, read at the fronts: the opt-in, the text compared by meaning, the key
of everything that must match exactly, and the tenant scope.

Opt-in, per request (default off), on a router started with the semantic cache on:
  HTTP  body `"semantic_cache": true`, or header `X-Semantic-Cache: on` (`off` is the default);
  gRPC  `GenerateRequest.semantic_cache = true`.
Only deterministic requests may opt in (temperature 0, or a seed), without logprobs, with the prompt as text or
chat messages (token ids cannot be compared by meaning); anything else is refused by name (INVALID_ARGUMENT / 400),
as is an opt-in on a router whose cache is off.

What must match exactly (the parameters key): the endpoint (completion or chat), every sampling parameter (the
max_tokens the client sent; a chat request without one gets the rest of the context, which depends on the prompt,
so it is keyed as "unset"), and for chat everything before the last message plus the template options. What is
compared by meaning: the prompt text, or the last message's text.

Tenant scope: the tenant of the request's API key. With auth off every request is the tenant "default", unless it
names one in the header `X-Tenant-Id` (gRPC metadata `x-tenant-id`); with API keys on, that header may only
repeat the key's own tenant (PERMISSION_DENIED otherwise).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from router.errors import RouterError
from router.tenants import ANONYMOUS, Tenant
from workers.sampling_params import SamplingParams

FIELD = "semantic_cache"
OPT_IN_HEADER = "X-Semantic-Cache"  # request: on | off; response: hit | miss
TENANT_HEADER = "X-Tenant-Id"
TENANT_METADATA = "x-tenant-id"
MAX_TENANT_ID_LEN = 128
_TENANT_ID = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class SemanticQuery:
    text: str  # compared by meaning: the prompt, or the last chat message
    params_key: str  # everything that must match exactly (hex digest)
    tenant_id: str | None = None  # X-Tenant-Id / x-tenant-id, when sent
    # The client chose max_tokens: an answer cut at that length is as complete as it asked (else only "stop"
    # answers are kept).
    explicit_max_tokens: bool = True


def header_opt_in(value: str | None) -> bool:
    """X-Semantic-Cache's value: on/off (absent: off); anything else is refused by name."""
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered not in ("on", "off"):
        raise _bad(f"{OPT_IN_HEADER}: must be 'on' or 'off', got {value!r}")
    return lowered == "on"


def from_openai(body: dict, operation: str, params: SamplingParams, explicit_max_tokens: int | None,
                header_value: str | None, tenant_id: str | None) -> SemanticQuery | None:
    """The query of an OpenAI request body (already validated), or None when it did not opt in."""
    field_value = body.get(FIELD)
    if field_value is not None and not isinstance(field_value, bool):
        raise _bad(f"{FIELD}: must be a boolean, got {type(field_value).__name__}")
    if not (field_value or header_opt_in(header_value)):
        return None
    if operation == "chat":
        messages = body["messages"]
        text = _text(messages[-1].get("content"))
        context = {"messages": [{"role": m["role"], "content": _text(m.get("content"))} for m in messages[:-1]],
                   "role": messages[-1]["role"],
                   "options": [body.get(k) for k in ("add_generation_prompt", "continue_final_message",
                                                     "chat_template_kwargs")]}
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad(f"{FIELD}: needs the prompt as text; a prompt of token ids cannot be compared by meaning")
        text, context = prompt, None
    return SemanticQuery(text, params_key(operation, context, params, explicit_max_tokens), tenant_id,
                         explicit_max_tokens is not None)


def from_proto(kind: str, text: str | None, messages: list[dict] | None, chat_options: list, params: SamplingParams,
               tenant_id: str | None) -> SemanticQuery:
    """The query of an opted-in gRPC request: `kind` is the input oneof ("text", "chat", "token_ids")."""
    if kind == "text":
        return SemanticQuery(text, params_key("text_completion", None, params, params.max_tokens), tenant_id)
    if kind == "chat" and messages:
        context = {"messages": messages[:-1], "role": messages[-1]["role"], "options": chat_options}
        return SemanticQuery(messages[-1]["content"], params_key("chat", context, params, params.max_tokens),
                             tenant_id)
    raise _bad(f"{FIELD}: needs the input as text or chat messages; token ids cannot be compared by meaning")


def params_key(operation: str, context: object, params: SamplingParams, explicit_max_tokens: int | None) -> str:
    """The digest of everything a cached answer must share with the request besides the compared text."""
    sampling = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, Mapping):  # logit_bias
            value = sorted(value.items())
        elif isinstance(value, (list, tuple)):
            value = list(value)
        sampling[f.name] = value
    sampling["max_tokens"] = explicit_max_tokens
    doc = json.dumps([operation, context, sampling], sort_keys=True, default=list, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def check_opt_in(enabled: bool, params: SamplingParams) -> None:
    """Refuse by name an opt-in the cache cannot honour."""
    if not enabled:
        raise _bad(f"{FIELD}: the semantic cache is off on this router (start it with --semantic-cache)")
    if params.temperature > 0 and params.seed is None:
        raise _bad(f"{FIELD}: only deterministic requests can be cached: set temperature to 0 or give a seed "
                   f"(got temperature={params.temperature:g} without a seed)")
    if params.logprobs is not None:
        raise _bad(f"{FIELD}: cannot be combined with logprobs (cached answers keep no logprobs)")


def cache_tenant(tenant: Tenant, tenant_id: str | None) -> str:
    """The scope of a request's cache entries: its API key's tenant; with auth off, X-Tenant-Id or "default"."""
    if tenant_id is None:
        return tenant.name
    if len(tenant_id) > MAX_TENANT_ID_LEN or not _TENANT_ID.fullmatch(tenant_id):
        raise _bad(f"{TENANT_HEADER}: must be 1 to {MAX_TENANT_ID_LEN} printable ASCII characters without spaces")
    if tenant is ANONYMOUS:
        return tenant_id
    if tenant_id != tenant.name:
        raise RouterError(grpc.StatusCode.PERMISSION_DENIED,
                          f"{TENANT_HEADER}: with API keys the tenant is the key's ({tenant.name!r}); "
                          f"got {tenant_id!r}")
    return tenant_id


def _text(content: object) -> str:
    """A message's text: a string, or its text parts joined by newlines (as the chat template gets it)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def _bad(message: str) -> RouterError:
    return RouterError(grpc.StatusCode.INVALID_ARGUMENT, message)
