"""The kv transports' wire format and the socket helpers that read it against a deadline.

Every message is a frame: a 4-byte big-endian length and a JSON object. A fetch over one connection:

    receiver -> sender   {"op": "fetch", "transfer_id": ...}
    sender -> receiver   {"ok": true, <payload header>}  then the body (see below)
                         or {"ok": false, "error": "..."} (the connection stays usable)
    receiver -> sender   {"op": "ack", "transfer_id": ...}  once it holds every byte
    sender -> receiver   {"ok": true}  committed: the sender has dropped the payload
                         or {"ok": false, "error": "..."}  (withdrawn while in flight: do not use it)

The body is the token ids as little-endian int64 (prompt, then output), then, for tcp, the kv tensor's raw bytes.
A connection carries one fetch at a time and may carry many in turn.
"""
from __future__ import annotations

import json
import socket
import struct
import time

import numpy as np
import torch

from workers.kv.handoff import KV_LAYOUT, KVPayload

_FRAME_LEN = struct.Struct("!I")
MAX_FRAME_BYTES = 16 << 20  # a header is small; anything bigger is a stray client or a corrupt stream
_TOKEN_DTYPE = np.dtype("<i8")
_METADATA_FIELDS = ("request_id", "model", "block_size", "dtype", "tp_rank", "tp_size", "num_computed_tokens",
                    "num_cached_tokens", "layout", "num_kv_heads_total")


class PeerClosed(ConnectionError):
    """The other side closed the connection at a frame boundary or mid-message."""


def _settimeout(sock: socket.socket, deadline: float | None) -> None:
    """Bound the next blocking call by `deadline` (time.monotonic()); None keeps the socket's own timeout."""
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(remaining)


def send_frame(sock: socket.socket, message: dict, deadline: float | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    _settimeout(sock, deadline)
    sock.sendall(_FRAME_LEN.pack(len(data)) + data)


def recv_frame(sock: socket.socket, deadline: float | None = None) -> dict:
    (length,) = _FRAME_LEN.unpack(recv_exact(sock, _FRAME_LEN.size, deadline))
    if length > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {length} bytes: not a kv transport peer")
    message = json.loads(recv_exact(sock, length, deadline))
    if not isinstance(message, dict):
        raise ConnectionError("frame is not a JSON object: not a kv transport peer")
    return message


def recv_exact(sock: socket.socket, num_bytes: int, deadline: float | None = None) -> bytearray:
    buf = bytearray(num_bytes)
    recv_exact_into(sock, memoryview(buf), deadline)
    return buf


def recv_exact_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the socket; PeerClosed if the peer closes first."""
    received = 0
    while received < len(view):
        _settimeout(sock, deadline)
        n = sock.recv_into(view[received:])
        if n == 0:
            raise PeerClosed(f"peer closed the connection after {received} of {len(view)} bytes")
        received += n


def send_body(sock: socket.socket, view: memoryview, stall_timeout_s: float, chunk_bytes: int = 16 << 20) -> None:
    """Send `view` in chunks, each bounded by `stall_timeout_s`, so a receiver that stops reading is noticed
    without capping how long a large body may take as a whole."""
    sock.settimeout(stall_timeout_s)
    for start in range(0, len(view), chunk_bytes):
        sock.sendall(view[start:start + chunk_bytes])


# --- payload header -------------------------------------------------------------------------------------


def payload_header(payload: KVPayload, **extra) -> tuple[dict, bytes]:
    """The header frame for `payload` (without the kv bytes) and the token-id bytes that follow it."""
    header = {"ok": True, **{name: getattr(payload, name) for name in _METADATA_FIELDS}}
    header.update(
        num_prompt_tokens=len(payload.prompt_token_ids),
        num_output_tokens=len(payload.output_token_ids),
        kv_shape=list(payload.kv.shape),
        kv_dtype=str(payload.kv.dtype).removeprefix("torch."),
        kv_nbytes=payload.num_bytes,
        **extra,
    )
    token_ids = np.asarray(list(payload.prompt_token_ids) + list(payload.output_token_ids), dtype=_TOKEN_DTYPE)
    return header, token_ids.tobytes()


def token_bytes_len(header: dict) -> int:
    return (header["num_prompt_tokens"] + header["num_output_tokens"]) * _TOKEN_DTYPE.itemsize


def kv_dtype(header: dict) -> torch.dtype:
    dtype = getattr(torch, header["kv_dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"kv_dtype: {header['kv_dtype']!r} is not a torch dtype")
    return dtype


def payload_from_header(header: dict, token_bytes: bytes | bytearray, kv_bytes: torch.Tensor) -> KVPayload:
    """Rebuild the payload from its header, token-id bytes and the kv's raw bytes (a uint8 tensor, viewed)."""
    token_ids = np.frombuffer(token_bytes, dtype=_TOKEN_DTYPE).tolist()
    num_prompt = header["num_prompt_tokens"]
    kv = kv_bytes.view(kv_dtype(header)).view(header["kv_shape"])
    # Senders from before the layout header had only the one layout, each rank holding an equal share of the heads.
    header = {"layout": KV_LAYOUT, "num_kv_heads_total": header["kv_shape"][4] * header["tp_size"], **header}
    return KVPayload(
        **{name: header[name] for name in _METADATA_FIELDS},
        prompt_token_ids=token_ids[:num_prompt],
        output_token_ids=token_ids[num_prompt:],
        kv=kv,
    )
