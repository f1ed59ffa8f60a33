"""The one exception the router's request path raises: a gRPC status for the client."""
from __future__ import annotations

import grpc


class RouterError(Exception):
    """Ends a client's call with `code`; the message names the offending field or pool. `retry_after_s`: when
    retrying could succeed (RESOURCE_EXHAUSTED), sent as gRPC trailing metadata `retry-after` and HTTP
    `Retry-After`, in whole seconds rounded up."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
