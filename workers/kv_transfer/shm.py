"""KV transfer through shared memory, for a sender and receiver on the same host; the tcp connection carries only
the header and the ack.

Each sender keeps one arena: a file in /dev/shm, mapped for its whole life. `offer` copies the kv into a free range
of it; `fetch` copies the range out into a new tensor and acknowledges, which frees the range. Reusing warm pages is
the point: on the dev VM, filling fresh tmpfs pages runs at ~2 GiB/s (a file per transfer measured 1.4 GiB/s end to
end, slower than tcp), a copy into warm ones at ~18 GiB/s.

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
import logging
import mmap
import os
import secrets
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from workers.kv.handoff import KVPayload
from workers.kv_transfer.base import KVTransferError, empty_host_bytes
from workers.kv_transfer.tcp import Staged, TcpKVTransport
from workers.kv_transfer.wire import payload_header

if TYPE_CHECKING:
    from tandem.tls import TLSConfig

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ARENA_PREFIX = "tandem-kv-"
_ALIGN_BYTES = 64 << 10  # ranges start on 64 KiB: page-aligned copies, and a short free list
_RESERVE_STEP_BYTES = 64 << 20  # fallocate grows the reserved pages by at least this much
_STALE_AGE_S = 10.0  # an unlocked arena younger than this may be one whose creator has not locked it yet
_MAX_MAPPED_ARENAS = 16  # receiver side


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
        self._free: list[tuple[int, int]] = []  # (offset, num_bytes), sorted, coalesced
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
                self._free = [(0, self.arena_bytes)]
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
            self._free = []
        if path is not None:
            try:
                os.unlink(path)  # before closing the fd, which releases the lock that marks the file as in use
            except FileNotFoundError:
                pass  # someone removed it by hand
        if fd is not None:
            os.close(fd)

    def _stage(self, transfer_id: str, payload: KVPayload) -> Staged:
        num_bytes = payload.num_bytes
        with self._lock:
            arena, path = self._arena, self._arena_path
            offset = self._allocate(num_bytes) if arena is not None else None
        if arena is None:
            problem = "the transport is closed" if self._closed else "the transport is not serving (call start() first)"
            raise KVTransferError(f"offer of transfer {transfer_id!r}: {problem}")
        if offset is None:
            log.info("shm arena full or out of /dev/shm: transfer %r (%d MiB) goes inline over tcp", transfer_id,
                     num_bytes >> 20)
            return super()._stage(transfer_id, payload)
        staged = Staged(*payload_header(payload, shm={"path": path, "offset": offset}), num_bytes, kv=None,
                        shm_range=(offset, num_bytes))
        try:
            # The one copy, from host or GPU memory straight into the shared pages. Host to host with numpy: a
            # plain memcpy, where torch's copy_ splits the work over its threads and waits for the slowest.
            dst, src = arena[offset:offset + num_bytes], payload.kv.detach().reshape(-1).view(torch.uint8)
            if src.device.type == "cpu":
                np.copyto(dst, src.numpy())
            else:
                torch.from_numpy(dst).copy_(src)
        except BaseException:
            self._unstage(staged)
            raise
        return staged

    def _unstage(self, staged: Staged) -> None:
        if staged.shm_range is None:
            return
        with self._lock:
            if self._arena is not None:  # after close() the arena, and with it every range, is gone
                self._release(*staged.shm_range)

    def _allocate(self, num_bytes: int) -> int | None:
        """First fit (low offsets first, to keep the reserved high-water mark low); None if it does not fit."""
        size = -(-max(num_bytes, 1) // _ALIGN_BYTES) * _ALIGN_BYTES
        for i, (offset, free_bytes) in enumerate(self._free):
            if free_bytes >= size:
                if not self._reserve(offset + size):
                    return None
                self._free[i:i + 1] = [(offset + size, free_bytes - size)] if free_bytes > size else []
                return offset
        return None

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

    def _release(self, offset: int, num_bytes: int) -> None:
        size = -(-max(num_bytes, 1) // _ALIGN_BYTES) * _ALIGN_BYTES
        free = sorted(self._free + [(offset, size)])
        merged: list[tuple[int, int]] = []
        for start, length in free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged

    # --- receiver side ----------------------------------------------------------------------------------

    def _recv_kv(self, sock, header: dict, deadline: float) -> torch.Tensor:
        if "shm" not in header:
            return super()._recv_kv(sock, header, deadline)  # the sender's arena was full: the bytes come inline
        path, offset, num_bytes = header["shm"]["path"], header["shm"]["offset"], header["kv_nbytes"]
        if os.path.dirname(path) != SHM_DIR or not os.path.basename(path).startswith(ARENA_PREFIX):
            raise ValueError(f"shm path {path!r} is not a KV arena")
        arena = self._map_arena(path)
        if offset < 0 or offset + num_bytes > len(arena):
            raise ValueError(f"shm range [{offset}, {offset + num_bytes}) lies outside the arena {path}")
        kv_bytes = empty_host_bytes(num_bytes)
        np.copyto(kv_bytes.numpy(), arena[offset:offset + num_bytes])
        return kv_bytes

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
