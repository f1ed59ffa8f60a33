"""The router's OpenAI-compatible HTTP front: aiohttp in the router's own loop, on its own port.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
A generation takes the gRPC path's road: a GenerateInput run by GenerateCall, whose GenerateResponse messages
become OpenAI JSON (router/openai_api.py). A client that goes away cancels its handler (handler_cancellation),
hence its GenerateCall, whose cleanup aborts the request on the workers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from aiohttp import web

from router.auth import TENANT, http_middleware
from router.cache.semantic import OPT_IN_HEADER
from router.convert import MAX_TIMEOUT_S, check_request_id, new_request_id
from router.errors import RouterError
from router.openai_api import (CHAT, COMPLETION, OpenAIRequest, ResponseBuilder, error_body, new_response_id,
                               parse_request, router_error_body)
from router.request import GenerateCall
from tandem.telemetry import metrics_handler
from tandem.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from router.server import Router

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
# Seconds the client gives the request (like a gRPC deadline); past it the request ends with 504.
TIMEOUT_HEADER = "X-Request-Timeout"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# Handlers still running when the HTTP server stops (the router has drained already) get this long.
SHUTDOWN_TIMEOUT_S = 0.5
_END = object()  # the GenerateCall returned
# Request bodies past this are refused with 413 (aiohttp's default is 1 MiB; a 128k-token prompt as token ids
# takes about 1 MB of JSON).
MAX_BODY_BYTES = 16 << 20
MAX_HEADER_BYTES = 64 << 10
# Deeper JSON is refused with 400: no field served nests past a few levels, and Python's parser recurses.
MAX_JSON_DEPTH = 32


class OpenAIServer:
    """Serves the OpenAI API for `router`; `start()` binds and returns "host:port", `stop()` ends every handler."""

    def __init__(self, router: Router):
        self.router = router
        self.created = int(time.time())
        auth = http_middleware(router.keys,
                               lambda e: _router_error(e, COMPLETION, {REQUEST_ID_HEADER: new_request_id()}))
        app = web.Application(middlewares=[self._errors, auth], client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", metrics_handler(router.telemetry))
        # max_field_size: aiohttp answers a longer header line with a plain-text 400 before any handler runs;
        # 64 KiB lets header values such as a 10k-character X-Request-Id reach the checks that name them.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S, max_field_size=MAX_HEADER_BYTES)

    async def start(self, host: str, port: int) -> str:
        await self._runner.setup()
        try:
            ssl_context = self.router.config.ssl.server_ssl_context() if self.router.config.ssl else None
            await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        except OSError as e:
            await self._runner.cleanup()
            raise RuntimeError(f"http_port: could not bind {host}:{port}: {e.strerror or e}") from None
        bound_port = self._runner.addresses[0][1]
        return f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    # --- endpoints ----------------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETION)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def models(self, request: web.Request) -> web.Response:
        router = self.router
        card = {"id": router.model.name, "object": "model", "created": self.created, "owned_by": "tandem",
                "root": router.model.name, "parent": None, "max_model_len": router.pool.max_model_len()}
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        router = self.router
        if router.draining:
            return _error(503, "router is draining")
        if not router.pool.is_ready():
            empty = [p for p in router.config.pools if not router.pool.num_live(p)]
            return _error(503, f"no live worker in the {', '.join(empty)} pool")
        if router.redis_state != "off":  # Redis down is not unhealthy: the router serves without the cache
            return web.json_response({"redis": router.redis_state})
        return web.Response(status=200)

    # --- generation ---------------------------------------------------------------------------------------

    async def _generate(self, request: web.Request, operation: str) -> web.StreamResponse:
        arrival = time.perf_counter()
        router = self.router
        request_id = new_response_id(operation)
        headers = {REQUEST_ID_HEADER: request_id}
        router.num_active += 1
        try:
            if request.headers.get(REQUEST_ID_HEADER):  # echoed only once it is known to be safe in a header
                request_id = check_request_id(request.headers[REQUEST_ID_HEADER], REQUEST_ID_HEADER)
                headers[REQUEST_ID_HEADER] = request_id
            if router.draining:
                raise RouterError(grpc.StatusCode.UNAVAILABLE, "router is draining")
            time_remaining = _time_remaining(request)
            body = await _read_json(request)
            req = parse_request(body, operation, request_id, router.model, router.pool.max_model_len(), request.headers)
            builder = ResponseBuilder(req, request_id, router.model)
            # W3C trace context; header names lowercased as gRPC metadata keys are.
            carrier = {k.lower(): v for k, v in request.headers.items()}

            def call(send: Callable) -> GenerateCall:
                return GenerateCall(router.services, req.inp, send, time_remaining, arrival, operation=operation,
                                    trace_carrier=carrier, tenant=request[TENANT])

            if req.stream:
                return await _stream(request, req, builder, call, headers)
            return await _respond(builder, call, headers)
        except RouterError as e:
            return _router_error(e, operation, headers)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", headers)
        finally:
            router.num_active -= 1

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """OpenAI error bodies for aiohttp's own errors (404, 405, ...) and for bugs (500, this request only)."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message, headers = f"{request.method} {request.path}: {e.reason}", {REQUEST_ID_HEADER: new_request_id()}
            if isinstance(e, web.HTTPMethodNotAllowed):
                allowed = ", ".join(sorted(e.allowed_methods))
                message, headers["Allow"] = f"{message} (allowed: {allowed})", allowed
            return _error(e.status, message, headers)
        except ConnectionResetError:  # the client went away
            raise
        except Exception as e:
            request_id = new_request_id()
            log.exception("%s %s (%s): unexpected error", request.method, request.path, request_id)
            return _error(500, f"router: {type(e).__name__}: {e}", {REQUEST_ID_HEADER: request_id})


def _semantic_cache_header(call: GenerateCall, headers: dict) -> dict:
    """X-Semantic-Cache: hit or miss, for a request that opted in to the semantic cache."""
    if call.semantic_query is None:
        return headers
    return {**headers, OPT_IN_HEADER: "hit" if call.semantic_cache_hit else "miss"}


async def _respond(builder: ResponseBuilder, call: Callable[..., GenerateCall], headers: dict) -> web.Response:
    completes: list[pb.Complete] = []

    async def send(msg: pb.GenerateResponse) -> None:
        if msg.HasField("chunk"):
            builder.choice(msg.chunk)
        else:
            completes.append(msg.complete)

    generate = call(send)
    await generate.run()
    builder.finish(completes[-1])
    return web.json_response(builder.response(), headers=_semantic_cache_header(generate, headers))


async def _stream(request: web.Request, req: OpenAIRequest, builder: ResponseBuilder,
                  call: Callable[..., GenerateCall], headers: dict) -> web.StreamResponse:
    """Runs the GenerateCall in a task that queues its messages; this handler writes them as SSE events.

    The queue lets the last chunk carry the finish_reason: GenerateCall sends a request's last Chunk and its
    Complete without yielding in between, so both are queued by the time this handler wakes. It is unbounded:
    a slow reader holds at most the request's max_tokens worth of messages. Errors before the first message
    get a plain error response with its status; after it, an error event.
    """
    queue: asyncio.Queue = asyncio.Queue()
    generate = call(queue.put)
    task = asyncio.create_task(_produce(generate, queue))
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            if not response.prepared:
                if isinstance(batch[0], RouterError):
                    return _router_error(batch[0], req.operation, headers)
                response.headers.update(_semantic_cache_header(generate, {}))  # known by the first message
                await response.prepare(request)
                if builder.chat:
                    await _event(response, builder.stream_chunk(builder.role_choice()))
            if await _write_batch(response, builder, batch):
                break
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        log.debug("%s: the client went away", req.inp.request_id)
    finally:
        if not task.done():
            task.cancel()  # the client went away: GenerateCall's cleanup aborts the request on the workers
        await asyncio.wait([task])
    return response


async def _write_batch(response: web.StreamResponse, builder: ResponseBuilder, batch: list) -> bool:
    """Write queued messages as events; True when the stream is over."""
    held: dict | None = None  # the newest chunk's choice, which the Complete right after it finishes
    for item in batch:
        if isinstance(item, pb.GenerateResponse) and item.HasField("chunk"):
            if held is not None:
                await _event(response, builder.stream_chunk(held))
            held = builder.choice(item.chunk)
        elif isinstance(item, pb.GenerateResponse):
            try:
                reason = builder.finish(item.complete)
            except RouterError as e:
                item = e
            else:
                choice = held or builder.empty_choice()
                await _event(response, builder.stream_chunk({**choice, "finish_reason": reason}))
                held = None
                if builder.req.include_usage:
                    await _event(response, builder.stream_chunk(None))
                continue
        if isinstance(item, RouterError):
            if held is not None:
                await _event(response, builder.stream_chunk(held))
            await _event(response, router_error_body(item, builder.req.operation)[1])
            return True
        if item is _END:
            return True
    if held is not None:
        await _event(response, builder.stream_chunk(held))
    return False


async def _produce(call: GenerateCall, queue: asyncio.Queue) -> None:
    """Run the call; queue _END or the RouterError it ended with (nothing when cancelled)."""
    try:
        await call.run()
    except RouterError as e:
        queue.put_nowait(e)
    except Exception as e:  # a bug: this request fails, the router keeps serving
        log.exception("%s: unexpected error", call.request_id)
        queue.put_nowait(RouterError(grpc.StatusCode.INTERNAL, f"router: {type(e).__name__}: {e}"))
    else:
        queue.put_nowait(_END)


async def _event(response: web.StreamResponse, body: dict) -> None:
    await response.write(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")


async def _read_json(request: web.Request) -> object:
    """The body as JSON; at most MAX_BODY_BYTES (aiohttp raises HTTPRequestEntityTooLarge past it)."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers of more than 4300 digits
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # Python's parser recurses per level
        raise _too_deep() from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    return body


def _too_deep() -> RouterError:
    return RouterError(grpc.StatusCode.INVALID_ARGUMENT, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")


def _depth(value: object) -> int:
    """How deeply lists and objects nest in a JSON value, iteratively (no recursion to overflow)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list) and depth > deepest:
            deepest = depth
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


def _time_remaining(request: web.Request) -> Callable[[], float | None]:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return lambda: None
    try:
        timeout_s = float(value)
    except ValueError:
        timeout_s = math.nan
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise RouterError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{TIMEOUT_HEADER}: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}")
    deadline = time.monotonic() + timeout_s
    return lambda: deadline - time.monotonic()


def _router_error(e: RouterError, operation: str, headers: dict) -> web.Response:
    status, body = router_error_body(e, operation)
    if e.retry_after_s is not None:
        headers = {**headers, "Retry-After": str(math.ceil(e.retry_after_s))}
    return web.json_response(body, status=status, headers=headers)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(status, message), status=status, headers=headers)
