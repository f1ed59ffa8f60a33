"""API-key checks at the router's two fronts: a grpc.aio server interceptor and an aiohttp middleware.

Open without a key: gRPC health (grpc.health.v1) and reflection, HTTP GET /health and /metrics (probes and
Prometheus scrapers carry no key). Everything else needs `authorization: Bearer <key>` (router/tenants.py):
UNAUTHENTICATED / HTTP 401 with `WWW-Authenticate: Bearer` otherwise. Handlers find the caller's tenant with
`grpc_tenant(keys, context)` or `request[TENANT]`.
"""
from __future__ import annotations

import grpc
from aiohttp import web

from router.convert import new_request_id
from router.errors import RouterError
from router.tenants import KeyStore, Tenant

# Where the HTTP middleware leaves the caller's Tenant on the aiohttp request.
TENANT = web.RequestKey("tandem.tenant", Tenant)
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
OPEN_HTTP_PATHS = ("/health", "/metrics")


def _authorization(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value
    return None


def grpc_tenant(keys: KeyStore, context: grpc.aio.ServicerContext) -> Tenant:
    """The caller's tenant, from its `authorization` metadata; RouterError UNAUTHENTICATED otherwise."""
    return keys.tenant(_authorization(context.invocation_metadata()))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key before their handler runs (the open services excepted)."""

    def __init__(self, keys: KeyStore):
        self.keys = keys

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if not self.keys.enabled or details.method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(details)
        try:
            self.keys.tenant(_authorization(details.invocation_metadata))
        except RouterError as e:
            handler = await continuation(details)
            return None if handler is None else _refusing(handler, e)
        return await continuation(details)


def _refusing(handler: grpc.RpcMethodHandler, error: RouterError) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):
        # A fresh id: the request's own is not read (nor trusted) before the caller is known.
        context.set_trailing_metadata((("request-id", new_request_id()),))
        await context.abort(error.code, error.message)

    async def refuse_stream(request_or_iterator, context):
        await refuse(request_or_iterator, context)
        yield  # an async generator, as streaming handlers are

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)


def http_middleware(keys: KeyStore, error_response):
    """aiohttp middleware: the caller's Tenant in request[TENANT], or `error_response(RouterError)` with
    `WWW-Authenticate: Bearer` (401)."""

    @web.middleware
    async def authenticate(request: web.Request, handler) -> web.StreamResponse:
        if request.path in OPEN_HTTP_PATHS:
            return await handler(request)
        try:
            request[TENANT] = keys.tenant(request.headers.get("Authorization"))
        except RouterError as e:
            response = error_response(e)
            response.headers["WWW-Authenticate"] = 'Bearer realm="tandem"'
            return response
        return await handler(request)

    return authenticate
