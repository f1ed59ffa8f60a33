"""The KV transport contract: how a prefill worker hands a request's KV cache straight to a decode worker.

The sender (prefill side) stages a payload under a transfer id with `offer`; the receiver (decode side), told the
sender's endpoint and the id by the router, pulls it with `fetch`. The receiver acknowledges once it holds every
byte; only then does the sender drop the payload and call `on_fetched`. A transfer is delivered at most once.

A transport may also read a payload one-sided, without the sender's process taking part: `offer` then returns a
locator (shm: where the payload lies in the sender's arena), which travels with the endpoint, and `fetch` given it
copies the bytes itself and acknowledges afterwards, in the background. The sender's Python threads are then off the
transfer's path (under load they wait for the GIL and a core behind the engine thread). The price: a payload
withdrawn while a receiver reads it one-sided may still reach that receiver (it is intact: ranges are not reused for
a grace period, and the receiver checks the payload's generation before and after its copy).
"""
from __future__ import annotations

import logging
import mmap
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from workers.kv.handoff import KVPayload
from workers.kv_transfer.arena import RangeAllocator

log = logging.getLogger(__name__)

_HUGE_PAGE_BYTES = 2 << 20


class KVTransferError(RuntimeError):
    """A transfer failed. The message names the transfer id, the endpoint and what went wrong."""


class KVTransport(ABC):
    """One object per process (per TP rank), used from any thread.

    Sender side: `start` once, then `offer` / `withdraw`; `on_fetched(transfer_id)` is called from a transport
    thread once a receiver has acknowledged a complete transfer. Receiver side: `fetch`, which needs no `start`.
    `close` stops serving and drops what is staged; a transport is not restarted after `close`.
    """

    name: str
    # True where offer() takes a CUDA kv without copying it to host memory first (cuda_ipc): the engine then
    # exports a hand-off's KV on its device.
    takes_device_payloads: bool = False

    def __init__(self) -> None:
        self.on_fetched: Callable[[str], None] | None = None
        self._stats = TransferStats()

    @abstractmethod
    def start(self, host: str = "127.0.0.1") -> str:
        """Start serving on `host` (port picked by the OS); return this side's endpoint, e.g. "127.0.0.1:40123"."""

    @property
    @abstractmethod
    def endpoint(self) -> str | None:
        """What `start` returned; None before it (and after `close`)."""

    @abstractmethod
    def offer(self, transfer_id: str, payload: KVPayload) -> str | None:
        """Stage `payload` to be fetched once. A CUDA kv tensor is copied to host memory here (cuda_ipc: into its
        device arena). Returns the locator
        a receiver passes to `fetch` to read it one-sided, or None where this transport or payload has none.

        Raises ValueError if `transfer_id` is already staged, KVTransferError if the transport is not serving.
        """

    @abstractmethod
    def withdraw(self, transfer_id: str) -> bool:
        """Drop a staged payload (cancel, lease expiry). True if it was still staged, even mid-transfer: a
        receiver then gets KVTransferError instead of the payload."""

    @abstractmethod
    def fetch(self, endpoint: str, transfer_id: str, timeout_s: float, locator: str | None = None) -> KVPayload:
        """Pull a staged payload from `endpoint`, acknowledge it and return it with its kv tensor on the CPU
        (cuda_ipc: on the calling thread's current CUDA device). With the
        `locator` its `offer` returned, read it one-sided where this transport can, and acknowledge it afterwards
        in the background (see the module docstring); an empty or None locator asks the sender.

        Raises KVTransferError for an unknown, withdrawn or already fetched id, a refused or broken connection,
        an unreadable locator, or when `timeout_s` runs out; it never blocks longer than `timeout_s`.
        """

    @abstractmethod
    def close(self) -> None:
        """Stop serving, drop staged payloads and release sockets and buffers. Idempotent."""

    @property
    def stats(self) -> dict[str, float]:
        """A snapshot of the counters: transfers_sent, bytes_sent (acknowledged transfers), transfers_received,
        bytes_received, seconds_receiving (successful fetches)."""
        return self._stats.snapshot()

    @staticmethod
    @abstractmethod
    def measure_raw_bandwidth(nbytes: int = 64 << 20, repeats: int = 3) -> float:
        """Bytes/s of this transport's raw data path on this host (the copies a transfer makes, with no protocol,
        framing or allocation): the yardstick for what offer + fetch achieve. Best of `repeats`."""


class TransferStats:
    """Thread-safe counters behind `KVTransport.stats`."""

    FIELDS = ("transfers_sent", "bytes_sent", "transfers_received", "bytes_received", "seconds_receiving")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(self.FIELDS, 0)

    def add_sent(self, num_bytes: int) -> None:
        with self._lock:
            self._values["transfers_sent"] += 1
            self._values["bytes_sent"] += num_bytes

    def add_received(self, num_bytes: int, seconds: float) -> None:
        with self._lock:
            self._values["transfers_received"] += 1
            self._values["bytes_received"] += num_bytes
            self._values["seconds_receiving"] += seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)


def empty_host_bytes(num_bytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor for receiving into, backed by huge pages where the kernel allows.

    A received payload lands in fresh memory, and first-touch page faults dominate a large receive: on the dev
    VM, 4 KiB pages fill at ~2.7 GiB/s, transparent huge pages at ~12 GiB/s. The kernel's THP setting is usually
    "madvise" and torch's allocator does not advise, so map the memory ourselves. (With THP defrag also at
    "madvise", a host with fragmented memory may compact on these faults.) The tensor keeps the mapping alive; it
    is unmapped when the tensor is freed, never explicitly: torch.frombuffer does not pin the buffer.
    """
    if num_bytes < _HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(num_bytes, dtype=torch.uint8)
    mapping = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.uint8)


class WarmBuffers:
    """Receive buffers cut from one mapping that stays mapped, so that a payload lands in pages an earlier one
    already faulted in: a receiver that allocated fresh memory for each payload spent most of a fetch faulting
    (17.6 MiB: 3.2 ms to fault fresh huge pages, with stalls of 30-45 ms in a quarter of the tries on the dev VM,
    against 2.5 ms for a copy into warm pages).

    `take(num_bytes)` returns a uint8 CPU tensor; its range goes back to the pool when the tensor's storage is freed
    (the last view of it dropped), on whichever thread that happens. When the pool has no free range large enough,
    `take` falls back to `empty_host_bytes`. `capacity_bytes` is address space: memory is only used up to the
    high-water mark of payloads held at once, and kept until the transport is gone.
    """

    def __init__(self, capacity_bytes: int = 1 << 30) -> None:
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._ranges = RangeAllocator(capacity_bytes, align_bytes=_HUGE_PAGE_BYTES)
        self._pool: np.ndarray | None = None  # mapped on the first take

    def take(self, num_bytes: int) -> torch.Tensor:
        with self._lock:
            if self._pool is None and num_bytes <= self.capacity_bytes:
                self._pool = np.frombuffer(host_mapping(self.capacity_bytes), dtype=np.uint8)
            offset = self._ranges.allocate(num_bytes) if num_bytes and self._pool is not None else None
        if offset is None:
            return empty_host_bytes(num_bytes)
        # torch.frombuffer holds `view` (through the buffer it exports) until the storage is freed, and nothing else
        # does: its finalizer therefore runs exactly when the tensor's memory is no longer in use.
        view = self._pool[offset:offset + num_bytes]
        weakref.finalize(view, self._give_back, offset, num_bytes)
        return torch.frombuffer(view, dtype=torch.uint8)

    def _give_back(self, offset: int, num_bytes: int) -> None:
        with self._lock:
            self._ranges.release(offset, num_bytes)

    @property
    def used_bytes(self) -> int:
        """Bytes of the pool held by tensors alive now (rounded up to 2 MiB each)."""
        with self._lock:
            return self._ranges.used_bytes


def host_mapping(num_bytes: int) -> mmap.mmap:
    """`num_bytes` of private anonymous memory, advised to huge pages where the kernel allows (see empty_host_bytes):
    for buffers that live as long as their transport, whose pages stay warm once touched."""
    mapping = mmap.mmap(-1, num_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (works for bfloat16, which numpy lacks)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
