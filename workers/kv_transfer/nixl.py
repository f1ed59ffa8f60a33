"""KV transfer through NIXL (the library vLLM and Dynamo move KV with): the receiver pulls the kv bytes with a
one-sided NIXL READ (UCX: shared memory or CMA on one host, TCP or RDMA across hosts); the tcp connection carries
the header, the sender's NIXL metadata and the ack, as for shm (see wire.py).

Sender: `offer` copies the payload into a range of the transport's arena, host memory registered with the NIXL agent
once (`arena_bytes`, 1 GiB of address space by default; pages are touched as ranges are first used), and puts into
the header the agent's partial metadata for the arena (its connection info and remote key, a few hundred bytes) and
the range's address. A READ of warm, registered memory runs at the raw READ's rate; one of a payload registered
for the occasion ran at half of it on the dev VM. A payload the arena cannot hold is registered where it lies
instead (no copy), and deregistered by `_unstage`. Receiver: `fetch` loads that metadata, registers
a fresh tensor, READs into it, polling against the fetch's deadline, then acknowledges as tcp does.

With TLS (TLSConfig.internal) the header and the ack go over mutual TLS, and the metadata a READ needs travels only
there; the kv bytes themselves cross through UCX, unencrypted.

Each transport has one NIXL agent, made on first use, in strict thread-sync mode: offers, withdrawals and fetches
run on many threads. Needs `nixl-cu13` (Linux x86_64); without it, selecting the transport raises ValueError.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workers.kv.handoff import KVPayload
from workers.kv_transfer.arena import RangeAllocator
from workers.kv_transfer.base import KVTransferError, host_mapping
from workers.kv_transfer.tcp import Staged, TcpKVTransport
from workers.kv_transfer.wire import payload_header

if TYPE_CHECKING:
    from tandem.tls import TLSConfig

log = logging.getLogger(__name__)

_POLL_S = 200e-6  # between checks of a transfer in flight: UCX's progress thread moves the bytes meanwhile
INSTALL_HINT = "pip install 'nixl-cu13==1.5.1' (Linux x86_64)"


def nixl_api():
    """The nixl_cu13 API module; ValueError naming kv_transport if it is not installed."""
    try:
        from nixl_cu13 import _api
    except ImportError as e:
        raise ValueError(f"kv_transport: 'nixl' needs the NIXL library, which is not importable here ({e}); "
                         f"install it with {INSTALL_HINT}, or use kv_transport 'tcp' or 'shm'") from None
    return _api


def make_agent(prefix: str) -> Any:
    api = nixl_api()
    config = api.nixl_agent_config(backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    agent = api.nixl_agent(f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}", config)
    if "UCX" not in agent.backends:
        raise KVTransferError(f"nixl transport: NIXL has no UCX backend here (plugins: {agent.get_plugin_list()})")
    return agent


@dataclass
class NixlStaged(Staged):
    source: torch.Tensor | None = None  # [num_bytes] uint8, the registered host memory a receiver READs
    agent: Any = None  # the agent it is registered with (close() drops the transport's)
    registration: Any = None  # the nixlRegDList to deregister (a payload registered where it lies)
    arena_range: tuple[int, int] | None = None  # (offset, num_bytes) in the sender's arena


class _Arena:
    """The sender's staging memory: registered with the agent once, cut into ranges per payload."""

    def __init__(self, agent: Any, num_bytes: int) -> None:
        self.buffer = torch.frombuffer(host_mapping(num_bytes), dtype=torch.uint8)  # [num_bytes]
        self.agent = agent
        self.registration = agent.register_memory([self.buffer])
        try:
            self.metadata = base64.b64encode(agent.get_partial_agent_metadata(self.registration, True, ["UCX"])).decode()
        except BaseException:
            agent.deregister_memory(self.registration)
            raise
        self.ranges = RangeAllocator(num_bytes)

    def close(self) -> None:
        self.agent.deregister_memory(self.registration)


class NixlKVTransport(TcpKVTransport):
    name = "nixl"

    def __init__(self, tls: TLSConfig | None = None, arena_bytes: int = 1 << 30) -> None:
        nixl_api()  # fail at selection, not at the first transfer
        super().__init__(tls)
        self.arena_bytes = arena_bytes
        self._agent: Any = None
        self._arena: _Arena | None = None  # sender side, made on the first offer
        self._agent_lock = threading.Lock()
        self._uncancelled: list[torch.Tensor] = []  # receive buffers of READs UCX could not cancel: never freed

    def agent(self) -> Any:
        with self._agent_lock:
            if self._agent is None:
                self._agent = make_agent("tandem-kv")
            return self._agent

    def _sender_arena(self) -> _Arena:
        agent = self.agent()
        with self._agent_lock:
            if self._arena is None:
                self._arena = _Arena(agent, self.arena_bytes)
            return self._arena

    def close(self) -> None:
        super().close()  # unstages, so deregisters, every payload
        # Freed here rather than at interpreter exit, where tearing down its threads aborts the process. A fetch
        # still running on another thread holds its own reference; a later one makes a new agent.
        with self._agent_lock:
            arena, self._arena, self._agent = self._arena, None, None
        if arena is not None:
            arena.close()

    # --- sender side ------------------------------------------------------------------------------------

    def _stage(self, transfer_id: str, payload: KVPayload) -> Staged:
        if payload.num_bytes == 0 or self._closed or self._listener is None:
            return super()._stage(transfer_id, payload)  # nothing to register; offer() reports a closed transport
        staged = self._stage_in_arena(payload)
        if staged is not None:
            return staged
        agent = self.agent()
        log.info("nixl arena full: transfer %r (%d MiB) is registered where it lies", transfer_id,
                 payload.num_bytes >> 20)
        # No copy for a contiguous CPU tensor: the caller must leave it unmodified until it is fetched or withdrawn.
        source = payload.kv.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        registration = agent.register_memory([source])
        try:
            metadata = agent.get_partial_agent_metadata(registration, True, ["UCX"])
            region = {"agent": agent.name, "metadata": base64.b64encode(metadata).decode(),
                      "addr": source.data_ptr(), "len": source.numel()}
            header, token_bytes = payload_header(payload, nixl=region)
        except BaseException:
            agent.deregister_memory(registration)
            raise
        return NixlStaged(header, token_bytes, payload.num_bytes, kv=None, source=source, agent=agent,
                          registration=registration)

    def _stage_in_arena(self, payload: KVPayload) -> NixlStaged | None:
        """Copy the payload into a free range of the arena; None if none is large enough."""
        arena = self._sender_arena()
        with self._lock:
            offset = arena.ranges.allocate(payload.num_bytes)
        if offset is None:
            return None
        staged = NixlStaged({}, b"", payload.num_bytes, kv=None, agent=arena,
                            arena_range=(offset, payload.num_bytes))
        try:
            dst = arena.buffer[offset:offset + payload.num_bytes]
            src = payload.kv.detach().reshape(-1).view(torch.uint8)
            if src.device.type == "cpu":
                np.copyto(dst.numpy(), src.numpy())  # a plain memcpy, the GIL released
            else:
                dst.copy_(src)
            region = {"agent": arena.agent.name, "metadata": arena.metadata, "addr": dst.data_ptr(),
                      "len": payload.num_bytes}
            staged.header, staged.token_bytes = payload_header(payload, nixl=region)
        except BaseException:
            self._unstage(staged)
            raise
        return staged

    def _unstage(self, staged: Staged) -> None:
        if isinstance(staged, NixlStaged) and staged.arena_range is not None:
            # A READ still in flight (withdrawn mid-transfer) may read a range reused meanwhile; its receiver is
            # then told the transfer was withdrawn, and drops what it read.
            with self._lock:
                if staged.agent is self._arena:  # else close() dropped the arena, and every range with it
                    staged.agent.ranges.release(*staged.arena_range)
            staged.arena_range = staged.agent = None
        if isinstance(staged, NixlStaged) and staged.registration is not None:
            # A READ still in flight (withdrawn mid-transfer) fails on the receiver, which is then refused anyway.
            staged.agent.deregister_memory(staged.registration)
            staged.registration = staged.agent = None

    # --- receiver side ----------------------------------------------------------------------------------

    def _recv_kv(self, sock, header: dict, deadline: float) -> torch.Tensor:
        if "nixl" not in header:
            return super()._recv_kv(sock, header, deadline)  # an empty kv, sent inline
        region, num_bytes = header["nixl"], header["kv_nbytes"]
        if region["len"] != num_bytes:
            raise ValueError(f"nixl region of {region['len']} bytes for a kv of {num_bytes}")
        agent = self.agent()
        remote_agent = agent.add_remote_agent(base64.b64decode(region["metadata"]))
        kv_bytes = self.receive_buffers.take(num_bytes)
        registration = agent.register_memory([kv_bytes])
        try:
            read_into(agent, kv_bytes, remote_agent, region["addr"], deadline)
        except ReadNotCancelled:
            with self._agent_lock:
                self._uncancelled.append(kv_bytes)  # UCX may still write into it
            raise
        agent.deregister_memory(registration)
        return kv_bytes

    # --- yardstick -------------------------------------------------------------------------------------

    @staticmethod
    def measure_raw_bandwidth(nbytes: int = 64 << 20, repeats: int = 3) -> float:
        """A bare NIXL READ of `nbytes` from a child process's registered, warm buffer into this process's
        registered, warm buffer: no header, no registration or allocation per transfer."""
        child = subprocess.Popen([sys.executable, "-c", _RAW_SENDER, str(nbytes)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        watchdog = threading.Timer(120.0, child.kill)  # a child that hangs ends the readline below
        watchdog.start()
        try:
            line = "-"
            while line and not line.startswith("region "):  # NIXL logs to stdout too
                line = child.stdout.readline()
            if not line:
                raise KVTransferError("nixl transport: the raw-bandwidth child process failed or hung")
            _, metadata, addr = line.split()
            agent = make_agent("tandem-kv-raw")
            remote_agent = agent.add_remote_agent(base64.b64decode(metadata))
            dst = torch.zeros(nbytes, dtype=torch.uint8)
            registration = agent.register_memory([dst])
            best_s = float("inf")
            for _ in range(repeats + 1):  # the first READ connects
                t0 = time.perf_counter()
                read_into(agent, dst, remote_agent, int(addr), time.monotonic() + 60.0)
                best_s = min(best_s, time.perf_counter() - t0)
            agent.deregister_memory(registration)
        finally:
            watchdog.cancel()
            child.kill()
            child.wait()
        return nbytes / best_s


def read_into(agent: Any, dst: torch.Tensor, remote_agent: str, remote_addr: int, deadline: float) -> None:
    """NIXL READ of len(dst) bytes at `remote_addr` in `remote_agent`'s memory into the registered `dst`, by
    `deadline` (time.monotonic()); TimeoutError or ConnectionError otherwise."""
    local = agent.get_xfer_descs(dst)
    remote = agent.get_xfer_descs([(remote_addr, dst.numel(), 0)], "DRAM")
    handle = agent.initialize_xfer("READ", local, remote, remote_agent, backends=["UCX"])
    state = None
    try:
        state = agent.transfer(handle)
        while state == "PROC":
            if time.monotonic() >= deadline:
                raise TimeoutError("deadline passed during the NIXL READ")
            time.sleep(_POLL_S)
            state = agent.check_xfer_state(handle)
        if state != "DONE":
            raise ConnectionError(f"NIXL READ of {dst.numel()} bytes from agent {remote_agent!r} failed")
    finally:
        try:
            handle.release()  # cancels a READ still in flight
        except Exception as e:
            if state != "DONE":  # else nothing is in flight: the bytes are all here, only the handle leaks
                raise ReadNotCancelled(f"NIXL READ from agent {remote_agent!r} could not be cancelled: {e}") from e
            log.warning("nixl: releasing a finished READ's handle failed: %s", e)


class ReadNotCancelled(ConnectionError):
    """A READ that timed out or failed is still in flight: its destination must stay allocated."""


# The child of measure_raw_bandwidth: registers a warm buffer, prints its metadata and address, waits to be killed.
_RAW_SENDER = """
import base64, sys
import numpy as np
from nixl_cu13._api import nixl_agent, nixl_agent_config
nbytes = int(sys.argv[1])
agent = nixl_agent("tandem-kv-raw-src", nixl_agent_config(backends=["UCX"]))
src = np.ones(nbytes, dtype=np.uint8)
registration = agent.register_memory([(src.ctypes.data, nbytes, 0, "")], "DRAM")
metadata = agent.get_partial_agent_metadata(registration, True, ["UCX"])
print("region", base64.b64encode(metadata).decode(), src.ctypes.data, flush=True)
sys.stdin.read()
"""
