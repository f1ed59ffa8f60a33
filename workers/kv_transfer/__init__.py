"""KV-cache transports: how a prefill worker's KV payload reaches a decode worker, straight between the two.

    transport = make_kv_transport("tcp")
    endpoint = transport.start()                    # sender: serve, and tell the router this endpoint
    transport.offer(transfer_id, payload)
    payload = other.fetch(endpoint, transfer_id, timeout_s=10.0)   # receiver, in the decode worker

"tcp" works anywhere; "shm" (same host only: it moves the bytes through /dev/shm and uses tcp for the header
and the ack) is about twice as fast end to end on one host; "nixl" has the receiver READ the bytes through the
NIXL library (UCX), with tcp for the header and the ack, and needs nixl-cu13 installed; "cuda_ipc" (same node,
GPU to GPU) stages the kv in a device arena the receiver maps through CUDA IPC and copies device to device, so the
bytes never touch host memory; its `fetch` returns a CUDA kv tensor (the others a CPU one), and it needs CUDA. A shm,
nixl or cuda_ipc receiver can fetch from a tcp sender, not the other way round.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from workers.kv_transfer.base import KVTransferError, KVTransport
from workers.kv_transfer.cuda_ipc import CudaIpcKVTransport
from workers.kv_transfer.nixl import NixlKVTransport
from workers.kv_transfer.shm import ShmKVTransport
from workers.kv_transfer.tcp import TcpKVTransport

if TYPE_CHECKING:
    from tandem.tls import TLSConfig

_TRANSPORTS: dict[str, type[KVTransport]] = {TcpKVTransport.name: TcpKVTransport, ShmKVTransport.name: ShmKVTransport,
                                             NixlKVTransport.name: NixlKVTransport,
                                             CudaIpcKVTransport.name: CudaIpcKVTransport}
KV_TRANSPORTS: tuple[str, ...] = tuple(_TRANSPORTS)


def make_kv_transport(name: str, tls: TLSConfig | None = None) -> KVTransport:
    """A new, not yet started transport of the kind `name` (one of KV_TRANSPORTS); with `tls` (TLSConfig.internal)
    its tcp connections use mutual TLS. "nixl" raises ValueError if nixl-cu13 is not installed, "cuda_ipc" if torch
    sees no CUDA device."""
    if name not in _TRANSPORTS:
        raise ValueError(f"kv_transport: must be one of {', '.join(KV_TRANSPORTS)}, got {name!r}")
    return _TRANSPORTS[name](tls=tls)


__all__ = ["CudaIpcKVTransport", "KVTransferError", "KVTransport", "KV_TRANSPORTS", "NixlKVTransport", "ShmKVTransport",
           "TcpKVTransport", "make_kv_transport"]
