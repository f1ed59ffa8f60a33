"""Vectorized sampling over one batch of logits: penalties, temperature, top-k/top-p/min-p, seeded draws.

The order follows vLLM: raw logprobs → logit_bias → min_tokens ban → penalties → greedy argmax | temperature → top-k →
top-p → min-p → exponential race. A seeded row's token depends only on (seed, step, its own logits and
params), so a request yields the same tokens in any batch, any row position, any process, and after being
preempted and recomputed (on one kind of device: CPU and CUDA draw from different generators).

On CUDA a step never waits for the GPU except once, at the end: host data reaches the device through pinned
memory with asynchronous copies, and the sampled ids (with the logprobs when asked) come back in one copy.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from workers.sampling_params import SamplingParams

_MASK_63 = (1 << 63) - 1
_MASK_64 = (1 << 64) - 1


@dataclass
class SamplingBatch:
    """Per-row sampling state for one step, built once by the caller with `SamplingBatch.build`.

    Rows with greedy params carry neutral temperature/top-k/top-p/min-p so that the random path can run over
    the whole batch without special cases.
    """

    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows
    top_p: torch.Tensor  # [B] float32; 1.0 = off
    top_k: torch.Tensor  # [B] int64; 0 = off
    min_p: torch.Tensor  # [B] float32; 0.0 = off
    repetition_penalties: torch.Tensor  # [B] float32
    presence_penalties: torch.Tensor  # [B] float32
    frequency_penalties: torch.Tensor  # [B] float32
    greedy_mask: torch.Tensor  # [B] bool
    all_greedy: bool
    all_random: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    no_repetition_penalty: bool
    no_presence_frequency_penalty: bool
    # Largest `logprobs` asked for by any row; None when no row asked.
    max_num_logprobs: int | None
    seeds: list[int | None]
    # Output tokens generated so far per row: the index of the token being sampled now.
    steps: list[int]
    # Only read when some penalty is on.
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    # (row, token ids to ban) for rows still short of min_tokens.
    min_tokens_bans: list[tuple[int, tuple[int, ...]]]
    # (row, token id, bias) for every logit_bias entry of every row.
    logit_biases: list[tuple[int, int, float]]

    @property
    def num_rows(self) -> int:
        return len(self.seeds)

    @property
    def no_penalties(self) -> bool:
        return self.no_repetition_penalty and self.no_presence_frequency_penalty

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        if not len(params) == len(prompt_token_ids) == len(output_token_ids):
            raise ValueError(
                f"params, prompt_token_ids and output_token_ids must have one entry per row, got "
                f"{len(params)}, {len(prompt_token_ids)}, {len(output_token_ids)}"
            )
        greedy = [p.is_greedy for p in params]
        # Greedy rows get neutral values: they take the argmax, and neutral values keep the flags honest.
        temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        top_k = [0 if g else p.top_k for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]

        bans = []
        for row, (p, out) in enumerate(zip(params, output_token_ids)):
            if len(out) < p.min_tokens:
                banned = tuple(p.stop_token_ids) if p.ignore_eos else tuple(eos_token_ids) + tuple(p.stop_token_ids)
                if banned:
                    bans.append((row, banned))

        asked = [p.logprobs for p in params if p.logprobs is not None]
        biases = [(row, t, b) for row, p in enumerate(params) for t, b in p.logit_bias.items()]

        # One copy per dtype: each row of these is a view.
        floats = _to_device([temperature, top_p, min_p, rep, pres, freq], torch.float32, device)  # [6, B]
        ints = _to_device([top_k, greedy], torch.int64, device)  # [2, B]
        return cls(
            temperature=floats[0],
            top_p=floats[1],
            top_k=ints[0],
            min_p=floats[2],
            repetition_penalties=floats[3],
            presence_penalties=floats[4],
            frequency_penalties=floats[5],
            greedy_mask=ints[1].bool(),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_top_k=all(k == 0 for k in top_k),
            no_top_p=all(p >= 1.0 for p in top_p),
            no_min_p=all(p <= 0.0 for p in min_p),
            no_repetition_penalty=all(r == 1.0 for r in rep),
            no_presence_frequency_penalty=all(p == 0.0 for p in pres) and all(f == 0.0 for f in freq),
            max_num_logprobs=max(asked) if asked else None,
            seeds=[p.seed for p in params],
            steps=[len(out) for out in output_token_ids],
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids,
            min_tokens_bans=bans,
            logit_biases=biases,
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [B]
    # Log-prob of each sampled token under the raw model distribution (log_softmax of unprocessed logits).
    # None when no row asked for logprobs. CPU tensors, like the two below.
    logprobs: torch.Tensor | None  # [B] float32
    # Top-k raw logprobs with k = max_num_logprobs over rows; callers slice each row to its own `logprobs`.
    # None when no row asked for more than 0.
    top_logprob_ids: torch.Tensor | None  # [B, k] int64
    top_logprobs: torch.Tensor | None  # [B, k] float32


def _to_device(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of host data (nested lists) on `device`.

    For CUDA it is staged in pinned memory and copied asynchronously: a copy from pageable memory makes the host
    wait for the GPU. The caching host allocator keeps the pinned block alive until the copy is done.
    """
    tensor = torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def seed_for_step(seed: int, step: int) -> int:
    """A stable 63-bit generator seed from (request seed, output position); the same in every process."""
    h = hashlib.blake2b(digest_size=8)
    h.update((seed & _MASK_64).to_bytes(8, "little"))
    h.update((step & _MASK_64).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") & _MASK_63


class Sampler:
    """Turns a batch of logits into one token per row. Holds only a reusable generator per device."""

    def __init__(self):
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V] float32, unprocessed model output. Not modified in place."""
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]

        logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        device, vocab_size = logits.device, logits.shape[1]
        # Flat indices into the contiguous [B * V] view: index_add_/index_fill_ never wait for the GPU (advanced
        # indexing with host lists would). A token id >= V would land in the next row, hence the checks.
        flat_logits = logits.view(-1)
        if batch.logit_biases:
            bad = next((t for _, t, _ in batch.logit_biases if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(f"logit_bias: token id {bad} is out of the vocabulary (must be < {vocab_size})")
            # (row, token) pairs are unique (logit_bias is a dict per row), so adding equals `+=` per entry.
            flat_ids = _to_device([row * vocab_size + t for row, t, _ in batch.logit_biases], torch.int64, device)
            biases = _to_device([b for _, _, b in batch.logit_biases], torch.float32, device)
            flat_logits.index_add_(0, flat_ids, biases)
        if batch.min_tokens_bans:
            # A stop token id outside the vocabulary can never be sampled: nothing to ban.
            flat_ids = [row * vocab_size + t for row, ids in batch.min_tokens_bans for t in ids if t < vocab_size]
            if flat_ids:
                flat_logits.index_fill_(0, _to_device(flat_ids, torch.int64, device), float("-inf"))
        if not batch.no_penalties:
            logits = apply_penalties(logits, batch)

        greedy_ids = logits.argmax(dim=-1) if not batch.all_random else None  # [B]
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            sampled = self._sample_random(logits, batch)
            token_ids = sampled if greedy_ids is None else torch.where(batch.greedy_mask, greedy_ids, sampled)

        logprobs = top_ids = top_logprobs = None
        if raw_logprobs is not None:
            logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            if batch.max_num_logprobs > 0:
                top = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
                top_ids, top_logprobs = top.indices, top.values
        if device.type == "cuda":
            return _fetch_from_cuda(token_ids, logprobs, top_ids, top_logprobs)
        on_host = [None if t is None else t.cpu() for t in (logprobs, top_ids, top_logprobs)]
        return SamplerOutput(token_ids.tolist(), *on_host)

    def _sample_random(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperature.unsqueeze(1)
        if not (batch.no_top_k and batch.no_top_p):
            logits = apply_top_k_top_p(
                logits,
                None if batch.no_top_k else batch.top_k,
                None if batch.no_top_p else batch.top_p,
            )
        probs = logits.softmax(dim=-1)  # [B, V]
        if not batch.no_min_p:
            max_probs = probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < batch.min_p.unsqueeze(1) * max_probs, 0.0)
        return probs.div_(self._exponential_noise(probs, batch)).argmax(dim=-1)

    def _exponential_noise(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """q ~ Exp(1) per entry; argmax(probs / q) is then a draw from probs (the exponential race)."""
        q = torch.empty_like(probs)
        if any(s is None for s in batch.seeds):
            q.exponential_()
        gen = None
        for row, (seed, step) in enumerate(zip(batch.seeds, batch.steps)):
            if seed is None:
                continue
            if gen is None:
                gen = self._generator(probs.device)
            gen.manual_seed(seed_for_step(seed, step))
            q[row].exponential_(generator=gen)
        # exponential_ may return exactly 0; 0/0 would be NaN, and argmax would pick it.
        return q.clamp_(min=torch.finfo(q.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def _fetch_from_cuda(token_ids: torch.Tensor, logprobs: torch.Tensor | None, top_ids: torch.Tensor | None,
                     top_logprobs: torch.Tensor | None) -> SamplerOutput:
    """The step's one device-to-host copy and its one wait.

    float64 holds every column exactly: token ids (< 2**53) and float32 logprobs. The wait is an event
    synchronize, which, unlike a stream synchronize or a blocking copy, sync debug mode does not report.
    """
    cols = [token_ids.unsqueeze(1)]  # [B, 1]
    if logprobs is not None:
        cols.append(logprobs.unsqueeze(1))  # [B, 1]
    if top_ids is not None:
        cols += [top_ids, top_logprobs]  # [B, k] each
    packed = torch.cat([c.double() for c in cols], dim=1)  # [B, 1 (+ 1) (+ 2k)]
    host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(packed.device))
    done.synchronize()

    ids = host[:, 0].long().tolist()
    if logprobs is None:
        return SamplerOutput(ids, None, None, None)
    if top_ids is None:
        return SamplerOutput(ids, host[:, 1].float(), None, None)
    k = top_ids.shape[1]
    return SamplerOutput(ids, host[:, 1].float(), host[:, 2 : 2 + k].long(), host[:, 2 + k :].float())


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty (HF-style) over prompt and output tokens; presence/frequency over output tokens."""
    num_rows, vocab_size = logits.shape
    output_counts = _token_counts(batch.output_token_ids, num_rows, vocab_size, logits.device)  # [B, V]
    if not batch.no_repetition_penalty:
        prompt_counts = _token_counts(batch.prompt_token_ids, num_rows, vocab_size, logits.device)
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalties = batch.repetition_penalties.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalties, logits * penalties)
        logits = torch.where(seen, penalized, logits)
    if not batch.no_presence_frequency_penalty:
        logits = logits - batch.frequency_penalties.unsqueeze(1) * output_counts
        logits = logits - batch.presence_penalties.unsqueeze(1) * (output_counts > 0).float()
    return logits


def _token_counts(token_ids: list[list[int]], num_rows: int, vocab_size: int, device) -> torch.Tensor:
    """[num_rows, vocab_size] float32 occurrence counts. Ids >= vocab_size land in a dropped padding column."""
    max_len = max((len(ids) for ids in token_ids), default=0)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)
    if max_len:
        padded = [list(ids) + [vocab_size] * (max_len - len(ids)) for ids in token_ids]
        ids = _to_device(padded, torch.int64, device).clamp_(max=vocab_size)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its top-p nucleus (of the top-k distribution).

    top_k: [B] int64, 0 = off; top_p: [B] float32, 1.0 = off. Ties at the k-th value are all kept.
    """
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=False)  # [B, V] ascending
    if top_k is not None:
        k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)
        kth_value = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    if top_p is not None:
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low tail whose mass is <= 1 - p; always keep the most likely token.
        drop = cum_probs <= (1 - top_p).unsqueeze(1)
        drop[:, -1].fill_(False)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(sorted_logits).scatter_(1, sorted_ids, sorted_logits)
