"""KV transfer through shared memory, for a sender and receiver on the same host; the tcp connection carries only
the header and the ack.

Each sender keeps one arena: a file in /dev/shm, mapped for its whole life. `offer` copies the kv into a free range
of it; `fetch` copies the range out into a new tensor and acknowledges, which frees the range. Reusing warm pages is
the point: on the dev VM, filling fresh tmpfs pages runs at ~2 GiB/s (a file per transfer measured 1.4 GiB/s end to
end, slower than tcp), a copy into warm ones at ~18 GiB/s.

One-sided reads: a staged range holds, ahead of the kv, its generation (a u64 that names this staging; 0 once it is
released) and the header and token ids, so a receiver given the locator `offer` returns ("path|offset|generation")
reads the whole payload from the arena without the sender, then commits it in the background. It checks the
generation before and after its copy, and refuses a copy that took longer than half of QUARANTINE_S. A withdrawn
range (lease expired, request aborted: a reader may be copying it right now) is not reused for QUARANTINE_S, so no
copy that passes can have read it being overwritten. A committed range is reused at once: its reader is done, and
a second reader of the same payload (a retried hand-off) sees the generation change, since the sender zeroes it
before it rewrites the range and x86 keeps both the sender's stores and the reader's loads in order. Hence
one-sided reads only on x86-64; elsewhere `offer` returns no locator and every fetch asks the sender.

    range:  [generation u64][header_len u32][token_len u32][header JSON][token ids] ... [kv, 64-byte aligned]

Memory: the arena is `arena_bytes` of address space (default 1 GiB); pages are reserved with fallocate as the
high-water mark of staged bytes grows, and are kept until `close`. A payload that does not fit (arena full, or
/dev/shm out of space) is sent inline over tcp instead. The receiver keeps each sender's arena mapped between
fetches and drops the mapping once the sender's file is gone.

Leaks: `close` unlinks the arena. A sender that dies without closing leaves its file behind; it holds an flock on it
while alive, so the next shm transport to start on the host removes files whose lock is free.
"""
from __future__ import annotations

import fcntl
import glob
import json
import logging
import mmap
import os
import platform
import secrets
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from workers.kv.handoff import KVPayload
from workers.kv_transfer.arena import RangeAllocator
from workers.kv_transfer.base import KVTransferError
from workers.kv_transfer.tcp import Staged, TcpKVTransport
from workers.kv_transfer.wire import payload_from_header, payload_header

if TYPE_CHECKING:
    from tandem.tls import TLSConfig

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ARENA_PREFIX = "tandem-kv-"
_RESERVE_STEP_BYTES = 64 << 20  # fallocate grows the reserved pages by at least this much
_STALE_AGE_S = 10.0  # an unlocked arena younger than this may be one whose creator has not locked it yet
_MAX_MAPPED_ARENAS = 16  # receiver side
_PREAMBLE = np.dtype([("generation", "<u8"), ("header_len", "<u4"), ("token_len", "<u4")])
QUARANTINE_S = 1.0  # a withdrawn range waits this long before reuse, so that one-sided readers never see it rewritten
ONE_SIDED_READS = platform.machine() in ("x86_64", "AMD64")  # see the module docstring


class ShmKVTransport(TcpKVTransport):
    name = "shm"

    def __init__(self, arena_bytes: int = 1 << 30, tls: TLSConfig | None = None) -> None:
        super().__init__(tls)
        self.arena_bytes = arena_bytes
        # Sender side, all under self._lock.
        self._arena: np.ndarray | None = None  # [arena_bytes] uint8, the shared mapping
        self._arena_fd: int | None = None
        self._arena_path: str | None = None
        self._reserved_bytes = 0  # [0, reserved) has pages allocated (fallocate): writes there cannot SIGBUS
        self._ranges: RangeAllocator | None = None  # the arena's taken and free ranges
        self._quarantine: list[tuple[float, int, int]] = []  # (reusable from, offset, num_bytes), oldest first
        self._generation = secrets.randbits(62)  # of the last staging: unique per arena, never 0
        # Receiver side: arena path -> (inode, read-only mapping as uint8 array); under self._lock.
        self._mapped: dict[str, tuple[int, np.ndarray]] = {}

    # --- sender side ------------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1") -> str:
        if not os.path.isdir(SHM_DIR):
            raise KVTransferError(f"shm transport: {SHM_DIR} does not exist on this host; use kv_transport 'tcp'")
        with self._lock:
            self._check_startable()
        remove_stale_arenas()
        path = os.path.join(SHM_DIR, f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the fd closes, even if this process dies
            os.ftruncate(fd, self.arena_bytes)  # sparse: no memory until reserved
            arena = np.frombuffer(mmap.mmap(fd, self.arena_bytes), dtype=np.uint8)
            with self._lock:
                self._arena, self._arena_fd, self._arena_path = arena, fd, path
                self._ranges, self._quarantine = RangeAllocator(self.arena_bytes), []
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
            fd, path = self._arena_fd, self._arena_path
            # Not unmapped explicitly: a thread still copying holds a reference, and the mapping goes with the last.
            self._arena = self._arena_fd = self._arena_path = None
            self._ranges, self._quarantine = None, []
        if path is not None:
            try:
                os.unlink(path)  # before closing the fd, which releases the lock that marks the file as in use
            except FileNotFoundError:
                pass  # someone removed it by hand
        if fd is not None:
            os.close(fd)

    def _stage(self, transfer_id: str, payload: KVPayload) -> Staged:
        num_bytes = payload.num_bytes
        # The header's longest form (the offset written out below is shorter), to size the range before placing it.
        header, token_bytes = payload_header(payload, shm={"path": self._arena_path, "offset": 10**19})
        header_len = len(json.dumps(header, separators=(",", ":")))
        kv_start = _align(_PREAMBLE.itemsize + header_len + len(token_bytes), 64)
        with self._lock:
            arena, path = self._arena, self._arena_path
            offset = self._allocate(kv_start + num_bytes) if arena is not None else None
            self._generation += 1
            generation = self._generation
        if arena is None:
            problem = "the transport is closed" if self._closed else "the transport is not serving (call start() first)"
            raise KVTransferError(f"offer of transfer {transfer_id!r}: {problem}")
        if offset is None:
            log.info("shm arena full or out of /dev/shm: transfer %r (%d MiB) goes inline over tcp", transfer_id,
                     num_bytes >> 20)
            return super()._stage(transfer_id, payload)
        header["shm"] = {"path": path, "offset": offset + kv_start}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        staged = Staged(header, token_bytes, num_bytes, kv=None, shm_range=(offset, kv_start + num_bytes),
                        locator=f"{path}|{offset}|{generation}" if ONE_SIDED_READS else None, generation=generation)
        try:
            meta = arena[offset:offset + kv_start]
            meta[_PREAMBLE.itemsize:_PREAMBLE.itemsize + len(header_bytes)] = np.frombuffer(header_bytes, np.uint8)
            meta[_PREAMBLE.itemsize + len(header_bytes):][:len(token_bytes)] = np.frombuffer(token_bytes, np.uint8)
            # The one copy, from host or GPU memory straight into the shared pages. Host to host with numpy: a
            # plain memcpy, where torch's copy_ splits the work over its threads and waits for the slowest.
            dst = arena[offset + kv_start:offset + kv_start + num_bytes]
            src = payload.kv.detach().reshape(-1).view(torch.uint8)
            if src.device.type == "cpu":
                np.copyto(dst, src.numpy())
            else:
                torch.from_numpy(dst).copy_(src)
            preamble = meta[:_PREAMBLE.itemsize].view(_PREAMBLE)
            preamble["header_len"], preamble["token_len"] = len(header_bytes), len(token_bytes)
            # Last, so that a reader who sees this generation sees everything before it (x86 keeps stores in order).
            preamble["generation"] = generation
        except BaseException:
            self._unstage(staged)
            raise
        return staged

    def _unstage(self, staged: Staged) -> None:
        if staged.shm_range is None:
            return
        with self._lock:
            if self._arena is not None:  # after close() the arena, and with it every range, is gone
                offset, num_bytes = staged.shm_range
                self._arena[offset:offset + 8].view(np.uint64)[0] = 0  # one-sided readers now refuse it
                if staged.committed:
                    self._ranges.release(offset, num_bytes)
                else:
                    self._quarantine.append((time.monotonic() + QUARANTINE_S, offset, num_bytes))

    def _allocate(self, num_bytes: int) -> int | None:
        """First fit (low offsets first, to keep the reserved high-water mark low); None if it does not fit."""
        now = time.monotonic()
        while self._quarantine and self._quarantine[0][0] <= now:
            self._ranges.release(*self._quarantine.pop(0)[1:])
        return self._ranges.allocate(num_bytes, reserve=self._reserve)

    def _reserve(self, end: int) -> bool:
        """Allocate the arena's pages up to `end`, so that writing through the mapping cannot SIGBUS when /dev/shm
        is full; False if /dev/shm has no room."""
        if end <= self._reserved_bytes:
            return True
        new_end = min(self.arena_bytes, max(end, self._reserved_bytes + _RESERVE_STEP_BYTES))
        try:
            os.posix_fallocate(self._arena_fd, self._reserved_bytes, new_end - self._reserved_bytes)
        except OSError as e:
            log.warning("shm arena: cannot reserve %d MiB in %s: %s", new_end >> 20, SHM_DIR, e)
            return False
        self._reserved_bytes = new_end
        return True

    # --- receiver side ----------------------------------------------------------------------------------

    def _recv_kv(self, sock, header: dict, deadline: float) -> torch.Tensor:
        if "shm" not in header:
            return super()._recv_kv(sock, header, deadline)  # the sender's arena was full: the bytes come inline
        path, offset, num_bytes = header["shm"]["path"], header["shm"]["offset"], header["kv_nbytes"]
        arena = self._arena_at(path)
        if offset < 0 or offset + num_bytes > len(arena):
            raise ValueError(f"shm range [{offset}, {offset + num_bytes}) lies outside the arena {path}")
        kv_bytes = self.receive_buffers.take(num_bytes)
        np.copyto(kv_bytes.numpy(), arena[offset:offset + num_bytes])
        return kv_bytes

    def _read_direct(self, locator: str, deadline: float) -> tuple[KVPayload, int]:
        path, sep, rest = locator.partition("|")
        offset, sep2, generation = rest.partition("|")
        if not (sep and sep2 and offset.isdigit() and generation.isdigit()):
            raise ValueError(f"shm locator {locator[:200]!r} is not path|offset|generation")
        offset, generation = int(offset), int(generation)
        arena = self._arena_at(path)
        if offset + _PREAMBLE.itemsize > len(arena):
            raise ValueError(f"shm range at {offset} lies outside the arena {path}")
        started = time.monotonic()

        def check_generation() -> np.void:
            preamble = arena[offset:offset + _PREAMBLE.itemsize].view(_PREAMBLE)[0]
            if int(preamble["generation"]) != generation:
                raise ValueError("the payload is no longer staged (withdrawn, expired or already fetched)")
            return preamble

        preamble = check_generation()
        meta_start = offset + _PREAMBLE.itemsize
        header_len, token_len = int(preamble["header_len"]), int(preamble["token_len"])
        if meta_start + header_len + token_len > len(arena):
            raise ValueError(f"shm header at {offset} runs past the arena {path}")
        header = json.loads(arena[meta_start:meta_start + header_len].tobytes())
        token_bytes = arena[meta_start + header_len:meta_start + header_len + token_len].tobytes()
        kv_offset, num_bytes = header["shm"]["offset"], header["kv_nbytes"]
        if kv_offset < meta_start or kv_offset + num_bytes > len(arena):
            raise ValueError(f"shm kv range [{kv_offset}, {kv_offset + num_bytes}) lies outside the arena {path}")
        kv_bytes = self.receive_buffers.take(num_bytes)
        np.copyto(kv_bytes.numpy(), arena[kv_offset:kv_offset + num_bytes])
        check_generation()
        now = time.monotonic()
        if now - started > QUARANTINE_S / 2:
            raise ValueError(f"the copy took {now - started:.2f} s, longer than the {QUARANTINE_S / 2:g} s a "
                             f"released range is guaranteed to stay intact")
        if now > deadline:
            raise TimeoutError("deadline passed during the copy")
        return payload_from_header(header, token_bytes, kv_bytes), generation

    def _arena_at(self, path: str) -> np.ndarray:
        if os.path.dirname(path) != SHM_DIR or not os.path.basename(path).startswith(ARENA_PREFIX):
            raise ValueError(f"shm path {path!r} is not a KV arena")
        return self._map_arena(path)

    def _map_arena(self, path: str) -> np.ndarray:
        """The sender's arena, mapped read-only; kept mapped while its file exists."""
        with self._lock:
            self._forget_gone_arenas()
            if path in self._mapped:
                return self._mapped[path][1]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"shm segment {path} not found: the sender is on another host (or sees another "
                                    f"/dev/shm) or has closed; use kv_transport 'tcp' across hosts") from None
        try:
            stat = os.fstat(fd)
            arena = np.frombuffer(mmap.mmap(fd, stat.st_size, prot=mmap.PROT_READ), dtype=np.uint8)
        finally:
            os.close(fd)
        with self._lock:
            if len(self._mapped) >= _MAX_MAPPED_ARENAS:
                self._mapped.pop(next(iter(self._mapped)))
            self._mapped[path] = (stat.st_ino, arena)
        return arena

    def _forget_gone_arenas(self) -> None:
        """Drop mappings whose file was unlinked (the sender closed), which would otherwise pin its memory."""
        for path, (inode, _) in list(self._mapped.items()):
            try:
                alive = os.stat(path).st_ino == inode
            except FileNotFoundError:
                alive = False
            if not alive:
                del self._mapped[path]

    # --- yardstick -------------------------------------------------------------------------------------

    @staticmethod
    def measure_raw_bandwidth(nbytes: int = 64 << 20, repeats: int = 3) -> float:
        """The two copies of a transfer, into a warm /dev/shm mapping and out of it into a warm buffer, timed
        together. One process: these are plain memcpys, wherever they run."""
        path = os.path.join(SHM_DIR, f"{ARENA_PREFIX}raw-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            shared = np.frombuffer(mmap.mmap(fd, nbytes), dtype=np.uint8)
        finally:
            os.unlink(path)
            os.close(fd)
        src, dst = np.ones(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
        np.copyto(shared, src)  # fault every page in first
        best_s = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.copyto(shared, src)
            np.copyto(dst, shared)
            best_s = min(best_s, time.perf_counter() - t0)
        return nbytes / best_s


def _align(num_bytes: int, alignment: int) -> int:
    return -(-num_bytes // alignment) * alignment


def remove_stale_arenas(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink arenas left by shm senders that died without closing; return their paths.

    A live sender holds an flock on its arena; a dead one's lock is gone. Works across processes and PID
    namespaces that share the /dev/shm.
    """
    removed = []
    for path in glob.glob(os.path.join(shm_dir, ARENA_PREFIX + "*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or another user's
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > _STALE_AGE_S:
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass  # locked: its sender is alive
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d stale KV arenas from %s", len(removed), shm_dir)
    return removed
