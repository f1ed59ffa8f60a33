"""KV transfer from GPU to GPU on one node through CUDA IPC: the kv bytes never pass through host memory; the tcp
connection carries the header and the ack, as for shm (see wire.py).

Unlike the other transports, `fetch` returns the payload with a CUDA kv tensor, on the calling thread's current
device (the decode engine's import_kv takes it as it is). Both processes must see the sender's GPU (the same GPU
serves too); across nodes, or between GPUs that one side's CUDA_VISIBLE_DEVICES hides, use shm or tcp.

Sender: `start` allocates one device arena, `arena_bytes` of uint8 on the current device (default 4 GiB), and
exports it once with torch's CUDA IPC machinery (`UntypedStorage._share_cuda_`, what torch.multiprocessing sends
for a CUDA tensor). `offer` copies the kv (CUDA or CPU) into a free range of the arena (arena.RangeAllocator) and
waits for the copy before the payload can be fetched; the header carries the arena's IPC handle and the range's
offset. The receiver's ack frees the range. A payload that does not fit (arena full or too small) goes inline over
tcp, and the receiver copies it to its device.

Receiver: maps each sender's arena once (`UntypedStorage._new_shared_cuda`, as torch.multiprocessing's
rebuild_cuda_tensor does) and keeps the mapping for later fetches, at most 16 arenas, dropping those of an endpoint
whose fetch fails on the connection or the arena (a sender that closed). A fetch copies its range device to device
into a new tensor and waits for that copy before it acknowledges, since the ack lets the sender reuse the range.

Lifetime (torch's CUDA IPC rules): the sender keeps the arena alive until `close`; a receiver reads a range only
while the sender holds it for that fetch. After `close`, torch's IPC ref counting keeps the arena's memory in its
limbo while a receiver may still map it, rather than letting it be reused under the mapping: `close` runs
torch.cuda.ipc_collect, which frees it once the one receiver torch counts has let go; with several receivers (or
one that mapped it more than once) it may stay reserved until the sender's process exits.

Needs CUDA: without a CUDA device, selecting the transport raises ValueError.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workers.kv.handoff import KVPayload
from workers.kv_transfer.arena import RangeAllocator
from workers.kv_transfer.base import KVTransferError
from workers.kv_transfer.tcp import Staged, TcpKVTransport
from workers.kv_transfer.wire import payload_header

if TYPE_CHECKING:
    from tandem.tls import TLSConfig

log = logging.getLogger(__name__)

DEFAULT_ARENA_BYTES = 4 << 30
_MAX_MAPPED_ARENAS = 16  # receiver side
# Arenas this process exported, by arena id. CUDA cannot open an IPC handle in the process that exported it, so a
# receiver in the sender's own process reads the arena directly.
_OWN_ARENAS: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()


def require_cuda() -> None:
    """ValueError naming kv_transport unless torch sees a CUDA device in this process."""
    if not torch.cuda.is_available():
        raise ValueError(f"kv_transport: 'cuda_ipc' needs a CUDA device, and torch {torch.__version__} sees none here "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); use 'shm' or 'tcp'")


@dataclass
class DeviceStaged(Staged):
    arena_range: tuple[int, int] | None = None  # (offset, num_bytes) of the kv in the sender's device arena


class CudaIpcKVTransport(TcpKVTransport):
    name = "cuda_ipc"
    takes_device_payloads = True

    def __init__(self, arena_bytes: int = DEFAULT_ARENA_BYTES, tls: TLSConfig | None = None) -> None:
        require_cuda()  # fail at selection, not at the first transfer
        if arena_bytes < 1:
            raise ValueError(f"arena_bytes: must be >= 1, got {arena_bytes}")
        super().__init__(tls)
        self.arena_bytes = arena_bytes
        # Sender side, under self._lock.
        self._arena: torch.Tensor | None = None  # [arena_bytes] uint8 on the sender's device
        self._export: dict | None = None  # the header's "cuda_ipc" fields for the arena, less the offset
        self._ranges: RangeAllocator | None = None
        # Receiver side, under self._lock: arena id -> (endpoint, [arena_bytes] uint8 mapping of the sender's arena).
        self._mapped: OrderedDict[str, tuple[str, torch.Tensor]] = OrderedDict()
        self._map_lock = threading.Lock()  # one IPC open at a time, so that each arena is opened once
        self._fetching = threading.local()  # .endpoint: the fetch this thread runs, for _recv_kv

    # --- sender side ------------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1") -> str:
        with self._lock:
            self._check_startable()
        device = current_device()
        try:
            arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError as e:
            raise KVTransferError(f"cuda_ipc transport: no room for its {self.arena_bytes / (1 << 20):.0f} MiB arena "
                                  f"on {device}; lower arena_bytes or the engine's memory, or use kv_transport 'shm' "
                                  f"({e})") from None
        export = export_arena(arena)
        with self._lock:
            self._arena, self._export, self._ranges = arena, export, RangeAllocator(self.arena_bytes)
        _OWN_ARENAS[export["arena"]] = arena
        try:
            return super().start(host)
        except BaseException:
            self._drop_arena()
            raise

    def close(self) -> None:
        super().close()  # unstages every payload
        self._drop_arena()
        with self._lock:
            self._mapped.clear()

    def _drop_arena(self) -> None:
        with self._lock:
            arena, export = self._arena, self._export
            # Not freed under a thread still copying: it holds its own reference, and the memory goes with the last.
            self._arena = self._export = self._ranges = None
        if export is not None:
            _OWN_ARENAS.pop(export["arena"], None)
        if arena is not None:
            del arena
            torch.cuda.ipc_collect()  # frees the arena now if no receiver maps it any more, else when they let go

    def _stage(self, transfer_id: str, payload: KVPayload) -> Staged:
        num_bytes = payload.num_bytes
        with self._lock:
            arena, export, ranges = self._arena, self._export, self._ranges
            offset = ranges.allocate(num_bytes) if ranges is not None and num_bytes else None
        if arena is None:
            problem = "the transport is closed" if self._closed else "the transport is not serving (call start() first)"
            raise KVTransferError(f"offer of transfer {transfer_id!r}: {problem}")
        if offset is None:
            if num_bytes:
                log.info("cuda_ipc arena full: transfer %r (%d MiB) goes inline over tcp", transfer_id, num_bytes >> 20)
            return super()._stage(transfer_id, payload)
        staged = DeviceStaged(*payload_header(payload, cuda_ipc={**export, "offset": offset}), num_bytes, kv=None,
                              arena_range=(offset, num_bytes))
        try:
            src = payload.kv.detach().contiguous().reshape(-1).view(torch.uint8)  # [num_bytes]
            arena[offset:offset + num_bytes].copy_(src)
            wait_for_stream(arena.device)  # the bytes are in place before anyone can fetch them
        except BaseException:
            self._unstage(staged)
            raise
        return staged

    def _unstage(self, staged: Staged) -> None:
        if not isinstance(staged, DeviceStaged) or staged.arena_range is None:
            return
        with self._lock:
            if self._ranges is not None:  # after close() the arena, and with it every range, is gone
                self._ranges.release(*staged.arena_range)

    # --- receiver side ----------------------------------------------------------------------------------

    def fetch(self, endpoint: str, transfer_id: str, timeout_s: float, locator: str | None = None) -> KVPayload:
        """As KVTransport.fetch, but the payload's kv is a CUDA tensor on the calling thread's current device.
        cuda_ipc offers no locator (it has no one-sided read): a non-empty one is refused with KVTransferError."""
        self._fetching.endpoint = endpoint
        try:
            return super().fetch(endpoint, transfer_id, timeout_s, locator)
        except KVTransferError as e:
            if e.__cause__ is not None:  # the connection or the arena failed, not a refusal by a live sender
                self._forget_arenas(endpoint)
            raise
        finally:
            self._fetching.endpoint = None

    def _recv_kv(self, sock, header: dict, deadline: float) -> torch.Tensor:
        device = current_device()
        if "cuda_ipc" not in header:  # the sender's arena was full, or it is a tcp sender: the bytes come inline
            return super()._recv_kv(sock, header, deadline).to(device)
        region, num_bytes = header["cuda_ipc"], header["kv_nbytes"]
        arena = self._map_arena(getattr(self._fetching, "endpoint", None), region)
        offset = region["offset"]
        if not isinstance(offset, int) or offset < 0 or offset + num_bytes > arena.numel():
            raise ValueError(f"cuda_ipc range [{offset}, {offset} + {num_bytes}) lies outside the sender's arena of "
                             f"{arena.numel()} bytes")
        kv_bytes = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        kv_bytes.copy_(arena[offset:offset + num_bytes])
        wait_for_stream(device)  # before the ack, which hands the range back to the sender
        return kv_bytes

    def _map_arena(self, endpoint: str | None, region: dict) -> torch.Tensor:
        """The sender's arena as a [arena_bytes] uint8 tensor on its GPU, opened on first use and kept."""
        arena_id = region["arena"]
        own = _OWN_ARENAS.get(arena_id)
        if own is not None:
            return own  # not kept: the sender's close() must be able to free it
        with self._map_lock:
            with self._lock:
                if arena_id in self._mapped:
                    self._mapped.move_to_end(arena_id)
                    return self._mapped[arena_id][1]
            try:
                arena = open_arena(region)
            except RuntimeError as e:  # a CUDA error: a fetch fails with KVTransferError, never with this
                raise ValueError(f"cannot map the sender's cuda_ipc arena: {e}") from e
            with self._lock:
                for other, (other_endpoint, _) in list(self._mapped.items()):
                    if other_endpoint == endpoint:  # that sender's earlier arena: it restarted on the same port
                        del self._mapped[other]
                if len(self._mapped) >= _MAX_MAPPED_ARENAS:
                    self._mapped.popitem(last=False)
                self._mapped[arena_id] = (endpoint, arena)
            return arena

    def _forget_arenas(self, endpoint: str) -> None:
        with self._lock:
            for arena_id, (other_endpoint, _) in list(self._mapped.items()):
                if other_endpoint == endpoint:
                    del self._mapped[arena_id]

    # --- yardstick -------------------------------------------------------------------------------------

    @staticmethod
    def measure_raw_bandwidth(nbytes: int = 64 << 20, repeats: int = 3) -> float:
        """One device-to-device copy of `nbytes` between two warm buffers on the current device, synchronized: the
        copy a fetch makes out of the sender's arena (the offer's copy into the arena is the other one)."""
        require_cuda()
        device = current_device()
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm: the first copy pays for lazy initialisation
        torch.cuda.synchronize(device)
        best_s = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize(device)
            best_s = min(best_s, time.perf_counter() - t0)
        return nbytes / best_s


def current_device() -> torch.device:
    """The calling thread's current CUDA device: where an arena is allocated and where a fetch puts the kv."""
    return torch.device("cuda", torch.cuda.current_device())


def export_arena(arena: torch.Tensor) -> dict:
    """The JSON fields a receiver needs to map `arena` (a whole CUDA storage) with open_arena: its IPC handle, torch's
    IPC ref counter, its GPU's UUID and a random id that names this arena."""
    (device, handle, storage_bytes, storage_offset, ref_counter, ref_counter_offset, event,
     event_sync) = arena.untyped_storage()._share_cuda_()
    return {"arena": secrets.token_hex(8), "arena_bytes": arena.numel(), "device": device,
            "device_uuid": device_uuid(device), "handle": _b64(handle), "storage_bytes": storage_bytes,
            "storage_offset": storage_offset, "ref_counter": _b64(ref_counter),
            "ref_counter_offset": ref_counter_offset, "event": _b64(event), "event_sync": bool(event_sync)}


def open_arena(region: dict) -> torch.Tensor:
    """Map another process's arena from export_arena's fields: [arena_bytes] uint8 on the GPU that holds it.
    ValueError if that GPU is not visible here."""
    device = local_device_index(region.get("device_uuid"), region["device"])
    storage = torch.UntypedStorage._new_shared_cuda(
        device, _unb64(region["handle"]), region["storage_bytes"], region["storage_offset"],
        _unb64(region["ref_counter"]), region["ref_counter_offset"], _unb64(region["event"]), region["event_sync"])
    arena = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device)).set_(storage)
    if arena.numel() < region["arena_bytes"]:
        raise ValueError(f"cuda_ipc arena mapped with {arena.numel()} bytes, the sender has {region['arena_bytes']}")
    return arena[:region["arena_bytes"]]


def device_uuid(index: int) -> str | None:
    """The GPU's UUID (the same in every process, whatever CUDA_VISIBLE_DEVICES numbers it); None if torch lacks it."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else None


def local_device_index(uuid: str | None, sender_index: int) -> int:
    """This process's index of the sender's GPU, found by UUID; the sender's own index where either lacks UUIDs."""
    if uuid is None:
        return sender_index
    for index in range(torch.cuda.device_count()):
        ours = device_uuid(index)
        if ours is None:
            return sender_index
        if ours == uuid:
            return index
    raise ValueError(f"the sender's GPU {uuid} is not visible to this process (CUDA_VISIBLE_DEVICES="
                     f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): cuda_ipc needs both workers to see it; use "
                     "kv_transport 'shm'")


def wait_for_stream(device: torch.device) -> None:
    """Block until the work queued so far on `device`'s current stream is done (an event wait, not a device-wide
    synchronize: the engine's own work on other streams goes on)."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    done.synchronize()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)
