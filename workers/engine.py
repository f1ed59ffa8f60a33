"""LLMEngine: one synchronous step loop, schedule -> execute -> sample -> update.

It imports no service framework: servers and the offline LLM wrap it. Roles: "both" serves requests start to
finish; "prefill" stops each request after its first token and holds its KV for export; "decode" takes
imported KV and continues.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.config import EngineConfig
from workers.detokenizer import IncrementalDetokenizer
from workers.executor import Executor, MultiprocTPExecutor, TPDriverExecutor
from workers.kv.block_pool import hash_token_blocks
from workers.kv.events import KVCacheEvent
from workers.kv.handoff import KVPayload
from workers.kv.kv_cache_manager import KVCacheManager
from workers.kv.reshard import check_shard_set, reshard_kv
from workers.model.loader import load_model_config, resolve_model
from workers.model_runner import build_model_input
from workers.outputs import TokenEvent
from workers.parallel import shard_range
from workers.request import Request, RequestStatus
from workers.sampler import Sampler, SamplingBatch
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler, SchedulerOutput
from workers.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_handoff_pending: int
    num_blocks: int
    num_free_blocks: int
    block_size: int
    kv_cache_usage: float  # 0..1, blocks held by requests
    kv_cache_bytes: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    num_preemptions: int
    num_prompt_tokens: int  # of requests prefilled here
    num_generation_tokens: int  # sampled here (a prefill-role request's first token too)
    num_requests_finished: dict[str, int]  # by finish reason (stop, length, abort); not handed-off requests


class LLMEngine:
    def __init__(self, config: EngineConfig, tp_init_method: str | None = None):
        """`tp_init_method`: with tensor_parallel_size > 1, ranks 1..N-1 were started elsewhere (the cluster's Ray
        actors, cluster/tp_ranks.py) and meet this rank 0 at this address (tcp://host:port); None: spawn them here."""
        self.config = config
        self.source = resolve_model(config.model, config.load_format)
        self.model_config = load_model_config(self.source)
        self.model_name = self.source.name
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len: must be <= the model's max_position_embeddings={limit}, got {config.max_model_len}")
        self.max_model_len = config.max_model_len or limit
        for what in ("num_attention_heads", "num_key_value_heads"):
            shard_range(getattr(self.model_config, what), 0, config.tensor_parallel_size, what)
        self.tokenizer = load_tokenizer(self.source)
        if config.tensor_parallel_size == 1:
            self.executor = Executor(config, self.model_config, self.source, self.max_model_len)
        elif tp_init_method is None:
            self.executor = MultiprocTPExecutor(config, self.model_config, self.source, self.max_model_len)
        else:
            self.executor = TPDriverExecutor(config, self.model_config, self.source, self.max_model_len, tp_init_method)
        runner = self.executor.runner
        self.dtype = runner.dtype
        self.device = runner.device
        self.num_blocks = runner.num_blocks
        self.kv_bytes_per_block = runner.kv_bytes_per_block
        self.block_size = config.cache.block_size
        capacity = self.num_blocks * self.block_size
        if self.max_model_len > capacity:
            # A request must fit in the cache on its own, or the scheduler could never run it.
            if config.max_model_len is not None:
                self.executor.shutdown()
                raise ValueError(
                    f"max_model_len: {config.max_model_len} tokens exceed the KV cache capacity of {capacity} tokens; "
                    "raise kv_cache_memory_bytes (or gpu_memory_utilization) or lower max_model_len"
                )
            log.warning("max_model_len lowered from %d to the KV cache capacity, %d tokens", self.max_model_len, capacity)
            self.max_model_len = capacity
        sched = config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < self.max_model_len:
            # Unchunked, a prompt is one step: a longer one than the step budget would wait forever.
            self.executor.shutdown()
            raise ValueError(
                f"max_num_batched_tokens: {sched.max_num_batched_tokens} is smaller than max_model_len="
                f"{self.max_model_len}, so long prompts could never be scheduled with enable_chunked_prefill=False; "
                "raise max_num_batched_tokens, lower max_model_len, or enable chunked prefill"
            )
        self.kv = KVCacheManager(
            self.num_blocks, self.block_size, config.cache.enable_prefix_caching, hash_extra=self.model_name.encode(),
            enable_kv_cache_events=config.cache.enable_kv_cache_events,
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.sampler = Sampler()
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self.num_generation_tokens = 0
        self.num_requests_finished: dict[str, int] = {}
        self.kv_offload_sink: Callable[[list[int], list[torch.Tensor]], None] | None = None

    @property
    def role(self) -> str:
        return self.config.scheduler.role

    # --- requests --------------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer (load_format='dummy'); pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt: must be a string or a list of token ids, got {type(prompt).__name__}")
        if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise ValueError(f"prompt: token ids must be ints in [0, {self.model_config.vocab_size})")
        return list(prompt)

    def _make_request(self, req_id: str | None, prompt_ids: list[int], params: SamplingParams, priority: int,
                      output_ids: list[int] = ()) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        vocab_size = self.model_config.vocab_size
        bad_bias = next((t for t in params.logit_bias if t >= vocab_size), None)
        if bad_bias is not None:
            raise ValueError(f"logit_bias: token id {bad_bias} is out of the vocabulary (must be < {vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt_ids)} tokens leave no room to generate within max_model_len={self.max_model_len}; "
                f"the prompt must be at most {self.max_model_len - 1} tokens"
            )
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        room = self.max_model_len - len(prompt_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = self.model_config.eos_token_ids
        return Request(req_id, list(prompt_ids), params, max_tokens, eos, priority, output_token_ids=list(output_ids))

    def add_request(self, prompt: str | list[int], params: SamplingParams, req_id: str | None = None,
                    priority: int = 0, output_token_ids: list[int] = ()) -> str:
        """Validate and queue a request; bad input raises ValueError and leaves the engine untouched.

        `output_token_ids` resumes a request that generated those tokens elsewhere (migration): they are
        recomputed with the prompt, count against max_tokens, and keep seeded sampling on the same sequence.
        """
        output_token_ids = self.tokenize(list(output_token_ids)) if output_token_ids else []
        req = self._make_request(req_id, self.tokenize(prompt), params, priority, output_token_ids)
        if req.num_output_tokens >= req.max_tokens:
            raise ValueError(f"output_token_ids: {req.num_output_tokens} tokens already reach max_tokens={req.max_tokens}")
        self.scheduler.add_request(req)
        self._start_detokenizer(req)
        return req.req_id

    def _start_detokenizer(self, req: Request) -> None:
        # Without detokenize (cluster workers: routers detokenize), only token ids are tracked.
        tokenizer = self.tokenizer if self.config.detokenize else None
        detok = IncrementalDetokenizer(tokenizer, req.prompt_token_ids, req.params)
        if req.output_token_ids:
            detok.update(list(req.output_token_ids))
            detok.get_next_text_delta()  # already streamed by whoever produced these tokens
        self.detokenizers[req.req_id] = detok

    def abort_request(self, req_id: str) -> TokenEvent | None:
        """Abort a waiting, running or handed-off request and free its blocks; unknown ids are ignored."""
        req = self.scheduler.requests.get(req_id)
        if req is None:
            return None
        if req.status == RequestStatus.PREFILLED:
            # Handed off (or given up): its first token already counted as this engine's output.
            self.scheduler.release_handoff(req_id)
        else:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self._count_finished("abort")
        req.status = RequestStatus.FINISHED_ABORTED
        self.detokenizers.pop(req_id, None)
        return TokenEvent(req_id, [], "", None, "abort", None, req.num_prompt_tokens, max(req.num_cached_tokens, 0))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # --- the step ------------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        out = self.scheduler.schedule()
        self._offload_evicted()  # before this step's KV overwrites the slots of blocks it evicted
        if out.is_empty:
            return []
        inp = build_model_input(out, self.kv.block_ids)
        logits = self.executor.execute(inp)
        sampled, logprobs = self._sample(out, logits)
        stopped = self.scheduler.update_from_output(out, sampled)
        return self._make_events(out, sampled, logprobs, stopped)

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor | None):
        if logits is None:
            return {}, {}
        reqs = [s.request for s in out.seqs if s.samples]
        batch = SamplingBatch.build(
            [r.params for r in reqs], [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs],
            self.model_config.eos_token_ids, logits.device,
        )
        result = self.sampler(logits, batch)
        token_ids = result.token_ids.tolist() if torch.is_tensor(result.token_ids) else list(result.token_ids)
        sampled = {r.req_id: t for r, t in zip(reqs, token_ids)}
        logprobs = {}
        for row, r in enumerate(reqs):
            n = r.params.logprobs
            if n is None:
                continue
            entry = {token_ids[row]: float(result.logprobs[row])}
            if n > 0:
                ids = result.top_logprob_ids[row, :n].tolist()
                vals = result.top_logprobs[row, :n].tolist()
                entry.update({i: v for i, v in zip(ids, vals) if i not in entry})
            logprobs[r.req_id] = [entry]
        return sampled, logprobs

    def _make_events(self, out: SchedulerOutput, sampled, logprobs, stopped) -> list[TokenEvent]:
        events = []
        for seq in out.seqs:
            req = seq.request
            if req.req_id not in sampled:
                continue
            detok = self.detokenizers[req.req_id]
            # A stop token id or EOS ended it in the scheduler: its text is left out (include_stop_str_in_output).
            stop_str = detok.update([sampled[req.req_id]],
                                    stop_terminated=req.status == RequestStatus.FINISHED_STOPPED)
            if stop_str is not None and not req.status.is_finished:
                req.stop_reason = stop_str
                if req.status == RequestStatus.PREFILLED:
                    self.scheduler.release_handoff(req.req_id)
                else:
                    self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                req.status = RequestStatus.FINISHED_STOPPED
            if req.status.is_finished or req.status == RequestStatus.PREFILLED:
                self.detokenizers.pop(req.req_id, None)
            if req.status.is_finished:
                self._count_finished(req.status.finish_reason)
            events.append(TokenEvent(
                req.req_id, [sampled[req.req_id]], detok.get_next_text_delta(finished=req.status.is_finished),
                logprobs.get(req.req_id),
                req.status.finish_reason, req.stop_reason, req.num_prompt_tokens, max(req.num_cached_tokens, 0),
                req.arrival_time, req.first_scheduled_time,
            ))
        self.num_generation_tokens += len(events)
        return events

    def _count_finished(self, reason: str) -> None:
        self.num_requests_finished[reason] = self.num_requests_finished.get(reason, 0) + 1

    # --- KV hand-off -----------------------------------------------------------------------------------

    def export_kv(self, req_id: str, on_device: bool = False) -> list[KVPayload]:
        """The prompt KV of a request held after prefill, one payload per TP rank, in host memory (with
        `on_device`, on the engine's device where it has one and TP is 1). Blocks stay held until release_kv (the
        decode side confirmed) or abort_request."""
        req = self.scheduler.requests.get(req_id)
        if req is None or req.status != RequestStatus.PREFILLED:
            raise KeyError(f"request_id: {req_id!r} holds no KV for hand-off")
        num_blocks = -(-req.num_computed_tokens // self.block_size)
        block_ids = self.kv.block_ids(req_id)[:num_blocks]
        shards = self.executor.export_blocks(block_ids, on_device)
        return [
            KVPayload(req_id, self.model_name, self.block_size, str(self.dtype).removeprefix("torch."), rank,
                      len(shards), self.model_config.num_key_value_heads, list(req.prompt_token_ids),
                      list(req.output_token_ids), req.num_computed_tokens, max(req.num_cached_tokens, 0), kv)
            for rank, kv in enumerate(shards)
        ]

    def release_kv(self, req_id: str) -> None:
        self.scheduler.release_handoff(req_id)

    def import_kv(self, payloads: list[KVPayload] | KVPayload, params: SamplingParams, req_id: str | None = None,
                  priority: int = 0) -> str:
        """Adopt a prefilled request: copy its KV (skipping blocks this engine already caches) and keep
        decoding from its first token. `payloads`: every rank's shard, in rank order, from a prefill group of any
        TP size that divides the model's KV heads; they are regrouped to this engine's ranks."""
        payloads = [payloads] if isinstance(payloads, KVPayload) else list(payloads)
        c = self.model_config
        for p in payloads:
            p.check_compatible(model=self.model_name, block_size=self.block_size,
                               dtype=str(self.dtype).removeprefix("torch."), num_layers=c.num_hidden_layers,
                               num_kv_heads_total=c.num_key_value_heads, head_dim=c.head_dim)
        check_shard_set(payloads)
        first = payloads[0]
        req = self._make_request(req_id or first.request_id, first.prompt_token_ids, params, priority,
                                 first.output_token_ids)
        hits = self.kv.get_computed_blocks(req)[: first.kv.shape[2]]
        num_new = first.num_computed_tokens - len(hits) * self.block_size
        req.num_computed_tokens = 0
        if not self.kv.allocate_slots(req, num_new, hits):
            raise RuntimeError(f"import_kv: no free KV blocks for {first.num_computed_tokens} tokens")
        block_ids = self.kv.block_ids(req.req_id)
        fresh = list(range(len(hits), first.kv.shape[2]))
        self._offload_evicted()
        if fresh:
            # Cut to the fresh blocks first, so a reshard copies only those.
            per_rank = reshard_kv([p.kv[:, :, fresh[0]:] for p in payloads], self.executor.tp_size)
            self.executor.import_blocks([block_ids[i] for i in fresh], per_rank)
        req.num_computed_tokens = first.num_computed_tokens
        req.num_cached_tokens = first.num_cached_tokens
        self.kv.cache_blocks(req)
        self.scheduler.add_running(req)
        self._start_detokenizer(req)
        return req.req_id

    # --- KV offloading: a tier outside the engine (workers/kv_tier) -------------------------------------

    def set_kv_offload(self, sink: Callable[[list[int], list[torch.Tensor]], None] | None) -> None:
        """`sink(block_hashes, per_rank_kv)` receives the KV of every cached block that allocation evicts, before
        the slots are overwritten: one tensor per TP rank, [num_layers, 2, len(block_hashes), block_size,
        num_kv_heads, head_dim] on CPU. It runs on the engine thread and must only hand the tensors on."""
        self.kv_offload_sink = sink
        self.kv.pool.evicted = [] if sink is not None else None

    def _offload_evicted(self) -> None:
        evicted = self.kv.pool.evicted
        if not evicted:
            return
        block_ids = [block_id for block_id, _ in evicted]
        block_hashes = [block_hash for _, block_hash in evicted]
        evicted.clear()
        self.kv_offload_sink(block_hashes, self.executor.export_blocks(block_ids))

    def export_cached_blocks(self, block_hashes: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """The KV of those of `block_hashes` this engine's prefix cache holds: (the hashes found, in order; one
        tensor per TP rank, [num_layers, 2, len(found), block_size, num_kv_heads, head_dim] on CPU)."""
        found = [(h, block.block_id) for h in block_hashes if (block := self.kv.pool.lookup(h)) is not None]
        if not found:
            return [], []
        return [h for h, _ in found], self.executor.export_blocks([block_id for _, block_id in found])

    def insert_cached_blocks(self, token_ids: list[int], start_block: int, per_rank_kv: list[torch.Tensor]) -> int:
        """Adopt the KV of full blocks `start_block`, `start_block + 1`, ... of `token_ids` (computed elsewhere:
        a remote KV tier) into the prefix cache, under the chained hashes this engine computes. They stay free but
        cached, so the next request with this prefix hits them. Blocks only count after a cached prefix: if the
        cache no longer holds blocks [0, start_block), nothing is inserted. Returns the leading blocks of token_ids
        cached now. `per_rank_kv`: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] per TP rank."""
        if len(per_rank_kv) != self.executor.tp_size:
            raise ValueError(f"per_rank_kv: got {len(per_rank_kv)} shards, tensor_parallel_size={self.executor.tp_size}")
        if not self.kv.enable_prefix_caching:
            return 0
        num_blocks = per_rank_kv[0].shape[2]
        block_hashes = hash_token_blocks(token_ids[: (start_block + num_blocks) * self.block_size], self.block_size,
                                         self.kv.hash_extra)
        pool = self.kv.pool
        cached = []
        for block_hash in block_hashes:
            block = pool.lookup(block_hash)
            if block is None:
                break
            cached.append(block)
        num_cached = len(cached)
        if num_cached < start_block or num_cached == len(block_hashes):
            return num_cached
        pool.take(cached)  # held, so that allocating the new blocks cannot evict the prefix they continue
        new = pool.allocate(min(len(block_hashes) - num_cached, pool.num_free_blocks))
        self._offload_evicted()
        if new:
            skip = num_cached - start_block
            self.executor.import_blocks([b.block_id for b in new], [kv[:, :, skip : skip + len(new)] for kv in per_rank_kv])
            for block, block_hash in zip(new, block_hashes[num_cached:]):
                pool.cache_block(block, block_hash)
        pool.free(list(reversed(cached + new)))  # tail first: the tail is the first to go again
        return num_cached + len(new)

    # --- state -----------------------------------------------------------------------------------------

    def take_kv_events(self) -> list[KVCacheEvent]:
        """Prefix cache changes since the last call, oldest first (workers/kv/events.py); [] unless the engine
        was built with enable_kv_cache_events."""
        return self.kv.pool.take_events()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_handoff_pending=sum(r.status == RequestStatus.PREFILLED for r in self.scheduler.requests.values()),
            num_blocks=self.num_blocks,
            num_free_blocks=self.kv.num_free_blocks,
            block_size=self.block_size,
            kv_cache_usage=self.kv.usage,
            kv_cache_bytes=self.num_blocks * self.kv_bytes_per_block,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.scheduler.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_requests_finished=dict(self.num_requests_finished),
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
