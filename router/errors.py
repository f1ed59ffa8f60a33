"""The one exception the router's request path raises: a gRPC status for the client."""
from __future__ import annotations

import grpc


class RouterError(Exception):
    """Ends a client's call with `code`; the message names the offending field or pool."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
