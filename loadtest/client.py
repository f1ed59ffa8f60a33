"""Driving tandem.v1.Generation/Generate with asyncio: one grpc.aio channel, requests sent at their arrival
times (open loop) or by N workers (closed loop), one RequestRecord per request whatever happens to it."""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from loadtest.prompts import RequestSpec
from tandem.tls import TLSConfig, aio_channel
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc

# Statuses besides "OK" and the gRPC code names, for streams that ended without an error status but not well.
INCOMPLETE = "INCOMPLETE"  # the stream ended without a Complete message
FINISH_ERROR = "FINISH_ERROR"  # Complete with finish_reason ERROR
FINISH_ABORT = "FINISH_ABORT"  # Complete with finish_reason ABORT


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request. Times are from the client's clock; latencies in ms."""

    index: int
    kind: str
    group: int | None
    scheduled_s: float | None  # open loop: the planned send offset from the run's start
    send_s: float  # the actual send offset from the run's start
    status: str  # "OK", a gRPC status code name (UNAVAILABLE, ...), or INCOMPLETE / FINISH_ERROR / FINISH_ABORT
    error: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    cached_tokens: int  # prompt tokens the server found in its prefix cache (usage)
    finish_reason: str  # stop | length | abort | error, or "" without a Complete
    ttft_ms: float | None  # send to the first chunk with tokens
    e2el_ms: float  # send to the end of the stream (or the error)
    # Gaps between consecutive chunks, as `vllm bench serve` counts them: a chunk of k tokens is one gap.
    itl_ms: tuple[float, ...]
    chunk_tokens: tuple[int, ...]  # tokens per chunk, for throughput over time

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot_ms(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None with fewer than two tokens."""
        if self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.e2el_ms - self.ttft_ms) / (self.output_tokens - 1)


def make_request(spec: RequestSpec, model: str | None) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model or "", token_ids=pb.TokenIds(ids=spec.prompt_ids),
        sampling=pb.SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True, temperature=0.0))


async def send_one(stub: generation_pb2_grpc.GenerationStub, spec: RequestSpec, *, model: str | None,
                   timeout_s: float, start: float) -> RequestRecord:
    """Send one request and record it; never raises for a failed request (only on cancellation)."""
    request = make_request(spec, model)
    send = time.perf_counter()
    first = last = None
    itl_s: list[float] = []
    chunk_tokens: list[int] = []
    complete = None
    status, error = "OK", ""
    try:
        async for resp in stub.Generate(request, timeout=timeout_s):
            now = time.perf_counter()
            if resp.HasField("complete"):
                complete = resp.complete
            elif resp.chunk.token_ids:
                if first is None:
                    first = now
                else:
                    itl_s.append(now - last)
                last = now
                chunk_tokens.append(len(resp.chunk.token_ids))
    except grpc.aio.AioRpcError as e:
        status, error = e.code().name, e.details() or ""
    end = time.perf_counter()
    finish_reason = ""
    if complete is not None:
        finish_reason = pb.FinishReason.Name(complete.finish_reason).removeprefix("FINISH_REASON_").lower()
        if status == "OK" and complete.finish_reason == pb.FINISH_REASON_ERROR:
            status, error = FINISH_ERROR, complete.error_message
        elif status == "OK" and complete.finish_reason == pb.FINISH_REASON_ABORT:
            status = FINISH_ABORT
    elif status == "OK":
        status, error = INCOMPLETE, "the stream ended without a Complete message"
    usage = complete.usage if complete is not None else None
    return RequestRecord(
        index=spec.index, kind=spec.kind, group=spec.group, scheduled_s=spec.arrival_s, send_s=send - start,
        status=status, error=error,
        prompt_tokens=usage.prompt_tokens if usage is not None else len(spec.prompt_ids),
        max_tokens=spec.max_tokens,
        output_tokens=usage.completion_tokens if usage is not None else sum(chunk_tokens),
        cached_tokens=usage.cached_tokens if usage is not None else 0,
        finish_reason=finish_reason,
        ttft_ms=(first - send) * 1e3 if first is not None else None,
        e2el_ms=(end - send) * 1e3,
        itl_ms=tuple(g * 1e3 for g in itl_s), chunk_tokens=tuple(chunk_tokens))


@dataclass(frozen=True)
class LoadResult:
    records: list[RequestRecord]  # by request index
    duration_s: float  # the run's start to its last request's end (vLLM's benchmark duration)


class LoadDriver:
    """Sends a run's requests over one channel to `target` and collects their records.

    `on_record(record)` is called as each request ends (the progress bar). `tls` (tandem.tls.TLSConfig): connect
    with TLS; None: plaintext.
    """

    def __init__(self, target: str, *, model: str | None, timeout_s: float,
                 on_record: Callable[[RequestRecord], None] | None = None, tls: TLSConfig | None = None):
        self.target = target
        self.tls = tls
        self.model = model
        self.timeout_s = timeout_s
        self.on_record = on_record or (lambda record: None)

    async def run_open_loop(self, specs: Iterable[RequestSpec], connect_timeout_s: float = 10.0) -> LoadResult:
        """Each spec is sent at its arrival_s, whatever is in flight; waits for all of them to end."""
        async with self._channel(connect_timeout_s) as stub:
            start = time.perf_counter()
            tasks = []
            for spec in specs:
                delay = start + spec.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._send(stub, spec, start)))
            records = await asyncio.gather(*tasks)
            return LoadResult(list(records), time.perf_counter() - start)

    async def run_closed_loop(self, make_spec: Callable[[int], RequestSpec], *, concurrency: int,
                              num_requests: int | None, duration_s: float | None,
                              connect_timeout_s: float = 10.0) -> LoadResult:
        """`concurrency` workers each send a request as soon as their previous one ends, until `num_requests`
        have been sent or `duration_s` has passed."""
        async with self._channel(connect_timeout_s) as stub:
            start = time.perf_counter()
            indices = itertools.count()

            async def worker() -> list[RequestRecord]:
                out = []
                while duration_s is None or time.perf_counter() - start < duration_s:
                    index = next(indices)
                    if num_requests is not None and index >= num_requests:
                        break
                    out.append(await self._send(stub, make_spec(index), start))
                return out

            per_worker = await asyncio.gather(*(worker() for _ in range(concurrency)))
            records = sorted((r for rs in per_worker for r in rs), key=lambda r: r.index)
            return LoadResult(records, time.perf_counter() - start)

    async def _send(self, stub, spec: RequestSpec, start: float) -> RequestRecord:
        record = await send_one(stub, spec, model=self.model, timeout_s=self.timeout_s, start=start)
        self.on_record(record)
        return record

    def _channel(self, connect_timeout_s: float) -> "_Connected":
        return _Connected(self.target, connect_timeout_s, self.tls)


class _Connected:
    """`async with` a channel that is connected before the run's clock starts; ConnectionError if it cannot be."""

    def __init__(self, target: str, timeout_s: float, tls: TLSConfig | None = None):
        self.target, self.timeout_s, self.tls = target, timeout_s, tls
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> generation_pb2_grpc.GenerationStub:
        self.channel = aio_channel(self.target, self.tls)
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.timeout_s)
        except asyncio.TimeoutError:
            await self.channel.close()
            hint = "; over TLS: check --ca-certs, --certfile, --keyfile" if self.tls is not None else ""
            raise ConnectionError(f"--target: no gRPC server answered at {self.target} "
                                  f"within {self.timeout_s:.0f} s{hint}") from None
        return generation_pb2_grpc.GenerationStub(self.channel)

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
