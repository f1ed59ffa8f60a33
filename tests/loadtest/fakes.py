"""A fake tandem.v1.Generation server: a real grpc.aio server on a free port that streams scripted tokens.

Timing is scripted: the first chunk comes `ttft_s` after the request arrives, each later chunk of k tokens
`k * token_delay_s` after the previous one, where token_delay_s grows by `delay_per_inflight_s` for every
request in flight (a server that slows down under load). `fail(n)` may end the n-th request (0-based, in arrival
order) with a gRPC status instead.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    def __init__(self, *, ttft_s: float = 0.05, token_delay_s: float = 0.01, tokens_per_chunk: int = 1,
                 cached_tokens: int = 0, delay_per_inflight_s: float = 0.0,
                 fail: Callable[[int], grpc.StatusCode | None] = lambda n: None):
        self.ttft_s = ttft_s
        self.token_delay_s = token_delay_s
        self.tokens_per_chunk = tokens_per_chunk
        self.cached_tokens = cached_tokens
        self.delay_per_inflight_s = delay_per_inflight_s
        self.fail = fail
        self.requests: list[pb.GenerateRequest] = []
        self.num_in_flight = 0
        self.max_in_flight = 0
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        self.server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        await self.server.stop(None)

    def _delay_s(self) -> float:
        return self.token_delay_s + self.delay_per_inflight_s * self.num_in_flight

    async def Generate(self, request: pb.GenerateRequest, context):
        n = len(self.requests)
        self.requests.append(request)
        code = self.fail(n)
        if code is not None:
            await context.abort(code, f"scripted failure of request {n}")
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            num_tokens = request.sampling.max_tokens
            prompt_len = len(request.token_ids.ids)
            await asyncio.sleep(self.ttft_s)
            sent = 0
            while sent < num_tokens:
                k = min(self.tokens_per_chunk, num_tokens - sent)
                if sent:
                    await asyncio.sleep(k * self._delay_s())
                sent += k
                yield pb.GenerateResponse(chunk=pb.Chunk(
                    token_ids=list(range(sent - k, sent)), prompt_tokens=prompt_len, completion_tokens=sent,
                    cached_tokens=self.cached_tokens))
            yield pb.GenerateResponse(complete=pb.Complete(
                finish_reason=pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(prompt_tokens=prompt_len, completion_tokens=num_tokens,
                               cached_tokens=self.cached_tokens)))
        finally:
            self.num_in_flight -= 1
