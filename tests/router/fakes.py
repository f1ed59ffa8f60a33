"""Fake workers and a fake registry for router tests: real grpc.aio servers that emit scripted token ids.

A FakeWorker continues a script: a request whose output already holds n tokens gets script[n], script[n+1], ...
so a migrated request picks up exactly where it left off. The last script token finishes with STOP (like EOS),
max_tokens with LENGTH. KV "transfers" are entries in FakeCluster.transfers, taken by the decode side.
"""
from __future__ import annotations

import asyncio
import itertools

import grpc

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import worker_pb2, worker_pb2_grpc

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


class FakeCluster:
    """What fake workers share: KV offered by prefill workers, by transfer id."""

    def __init__(self):
        self.transfers: dict[str, "FakeWorker"] = {}


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    _ids = itertools.count()

    def __init__(self, cluster: FakeCluster, role: str, script: list[int], *, max_model_len: int = 512,
                 model: str = MODEL_NAME, num_free_blocks: int = 1000):
        self.cluster = cluster
        self.role = role
        self.script = script
        self.worker_id = f"fake-{role}-{next(self._ids)}"
        self.info = worker_pb2.WorkerInfo(worker_id=self.worker_id, role=role, model=model,
                                          max_model_len=max_model_len, block_size=16, tp_size=1)
        self.stats = worker_pb2.WorkerStats(num_blocks=1000, num_free_blocks=num_free_blocks)
        # What the router did here.
        self.prefills: list[worker_pb2.PrefillRequest] = []
        self.decodes: list[worker_pb2.DecodeRequest] = []
        self.aborted: list[str] = []
        self.cancelled: list[str] = []  # calls that ended because the router cancelled them
        self.held: set[str] = set()  # transfer ids of KV held for a decode worker
        # Behaviour knobs.
        self.prefill_error: tuple[grpc.StatusCode, str] | None = None
        self.prefill_delay_s = 0.0
        self.decode_error: tuple[grpc.StatusCode, str] | None = None
        self.decode_error_after = 0  # messages sent before decode_error ends the stream
        self.kv_error = False
        self.kv_pull_delay_s = 0.0
        self.token_delay_s = 0.0
        self.tokens_per_message = 1
        self.num_cached_prefix = 0
        # Cleared by stall(): every handler waits, its connection open, as in a stopped (SIGSTOP) process.
        self.running = asyncio.Event()
        self.running.set()
        self.server: grpc.aio.Server | None = None

    def stall(self) -> None:
        """Stop answering (call on the server's loop): stats, prefills and decode messages wait for resume()."""
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def start(self) -> None:
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.info.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)

    # --- Worker service -----------------------------------------------------------------------------------

    async def Prefill(self, request: worker_pb2.PrefillRequest, context):
        self.prefills.append(request)
        req = request.request
        if self.prefill_error is not None:
            await context.abort(*self.prefill_error)
        try:
            await asyncio.sleep(self.prefill_delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(req.request_id)
            raise
        try:
            await self.running.wait()
        except asyncio.CancelledError:
            self.cancelled.append(req.request_id)
            raise
        first = self.script[0]
        resp = worker_pb2.PrefillResponse(token_ids=[first], num_cached_tokens=3, queue_ms=1.5, prefill_ms=7.0,
                                          logprobs=_logprobs(req, first))
        max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") else 16
        if len(self.script) == 1:
            resp.finish_reason = pb.FINISH_REASON_STOP
        elif max_tokens == 1:
            resp.finish_reason = pb.FINISH_REASON_LENGTH
        else:
            transfer_id = f"{req.request_id}/kv"
            self.held.add(transfer_id)
            self.cluster.transfers[transfer_id] = self
            resp.kv.CopyFrom(worker_pb2.KVHandle(transfer_id=transfer_id, transport="fake", tp_size=1,
                                                 endpoints=[self.info.address], source_worker_id=self.worker_id))
        return resp

    async def Decode(self, request: worker_pb2.DecodeRequest, context):
        self.decodes.append(request)
        req = request.request
        first = worker_pb2.DecodeResponse()
        if request.HasField("kv"):
            try:
                await asyncio.sleep(self.kv_pull_delay_s)
                source = self.cluster.transfers.get(request.kv.transfer_id)
                if source is not None:
                    await source.running.wait()  # a stalled source does not serve its KV
            except asyncio.CancelledError:
                self.cancelled.append(req.request_id)
                raise
            source = self.cluster.transfers.pop(request.kv.transfer_id, None)
            if self.kv_error or source is None or request.kv.transfer_id not in source.held:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "kv: transfer not found (lease expired?)")
            source.held.discard(request.kv.transfer_id)
            num_done = 1  # the first token came with the KV
            first.kv_transfer_ms, first.kv_transfer_bytes = 2.0, 4096
        else:
            num_done = len(req.output_token_ids)
            first.queue_ms, first.prefill_ms = 0.5, 4.0
            first.num_cached_tokens = min(self.num_cached_prefix, len(req.prompt_token_ids) - 1)
        max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") else 16
        num_sent = 0
        try:
            while True:
                if self.decode_error is not None and num_sent >= self.decode_error_after:
                    await context.abort(*self.decode_error)
                await asyncio.sleep(self.token_delay_s)
                await self.running.wait()
                tokens = self.script[num_done:min(num_done + self.tokens_per_message, len(self.script), max_tokens)]
                num_done += len(tokens)
                msg = worker_pb2.DecodeResponse(token_ids=tokens,
                                                logprobs=[lp for t in tokens for lp in _logprobs(req, t)])
                if num_done >= len(self.script):
                    msg.finish_reason = pb.FINISH_REASON_STOP
                elif num_done >= max_tokens:
                    msg.finish_reason = pb.FINISH_REASON_LENGTH
                if num_sent == 0:
                    msg.MergeFrom(first)
                yield msg
                num_sent += 1
                if msg.finish_reason:
                    return
        except asyncio.CancelledError:
            self.cancelled.append(req.request_id)
            raise

    async def Abort(self, request: worker_pb2.AbortRequest, context):
        self.aborted.extend(request.request_ids)
        for engine_id in request.request_ids:
            self.held.discard(f"{engine_id}/kv")
        return worker_pb2.AbortResponse(num_aborted=len(request.request_ids))

    async def MatchPrefix(self, request: worker_pb2.MatchPrefixRequest, context):
        return worker_pb2.MatchPrefixResponse(num_cached_tokens=min(self.num_cached_prefix, len(request.token_ids) - 1))

    async def GetStats(self, request, context):
        await self.running.wait()
        stats = worker_pb2.WorkerStats()
        stats.CopyFrom(self.stats)
        stats.info.CopyFrom(self.info)
        return stats


def _logprobs(req: worker_pb2.EngineRequest, token: int) -> list[pb.TokenLogprob]:
    if not req.sampling.HasField("logprobs"):
        return []
    return [pb.TokenLogprob(token_id=token, logprob=-0.25, top_logprobs=[pb.TopLogprob(token_id=token, logprob=-0.25)])]


class FakeRegistry(worker_pb2_grpc.RegistryServicer):
    def __init__(self):
        self.workers: list[worker_pb2.WorkerInfo] = []
        self.version = 0
        self.server: grpc.aio.Server | None = None
        self.address = ""

    def set_workers(self, infos: list[worker_pb2.WorkerInfo]) -> None:
        self.workers = list(infos)
        self.version += 1

    async def start(self) -> None:
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_RegistryServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)

    async def ListWorkers(self, request, context):
        return worker_pb2.ListWorkersResponse(workers=self.workers, version=self.version)
