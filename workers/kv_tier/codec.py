"""One KV block of one TP rank as a Redis value: a fixed header, then the raw KV bytes.

The header says what the bytes are (dtype, shape, block size, the block's chained hash, the TP rank) and carries a
CRC32 of the payload, so a value from another model layout, a truncated write or a flipped bit is refused instead
of being attended to. Layout (little-endian): see `HEADER`.
"""
from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"TKVB"
VERSION = 1
# magic, version, dtype code, (reserved), tp_rank, tp_size, block_size, num_layers, num_kv_heads, head_dim,
# block_hash, payload bytes, payload CRC32
HEADER = struct.Struct("<4sHBBHHIIIIQQI")
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class BlockFormatError(ValueError):
    """A value that is not a block this engine can use: wrong magic, version, layout or size."""


class ChecksumError(BlockFormatError):
    """The payload's CRC32 does not match its header: corrupted in flight or at rest."""


@dataclass(frozen=True)
class BlockLayout:
    """What every block of one engine and TP rank looks like; a value must match it exactly."""

    dtype: torch.dtype
    tp_rank: int
    tp_size: int
    block_size: int
    num_layers: int
    num_kv_heads: int  # this rank's
    head_dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        # [num_layers, 2 (k, v), block_size, num_kv_heads, head_dim]
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def payload_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def value_bytes(self) -> int:
        return HEADER.size + self.payload_bytes


def encode_block(layout: BlockLayout, block_hash: int, kv: torch.Tensor) -> bytes:
    """`kv`: one block, [num_layers, 2, block_size, num_kv_heads, head_dim], of layout.dtype."""
    if tuple(kv.shape) != layout.shape or kv.dtype != layout.dtype:
        raise ValueError(f"kv: shape {tuple(kv.shape)} {kv.dtype} does not fit the layout {layout.shape} {layout.dtype}")
    payload = kv.contiguous().view(torch.uint8).numpy().tobytes()
    header = HEADER.pack(MAGIC, VERSION, DTYPE_CODES[layout.dtype], 0, layout.tp_rank, layout.tp_size,
                         layout.block_size, layout.num_layers, layout.num_kv_heads, layout.head_dim,
                         block_hash, len(payload), zlib.crc32(payload))
    return header + payload


def decode_block(layout: BlockLayout, block_hash: int, value: bytes) -> torch.Tensor:
    """The block's KV, [num_layers, 2, block_size, num_kv_heads, head_dim]; BlockFormatError (ChecksumError for a
    bad CRC) if the value is not exactly this block in this layout."""
    if len(value) < HEADER.size:
        raise BlockFormatError(f"value: {len(value)} bytes, shorter than the {HEADER.size}-byte header")
    (magic, version, dtype_code, _, tp_rank, tp_size, block_size, num_layers, num_kv_heads, head_dim, got_hash,
     payload_len, crc) = HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION:
        raise BlockFormatError(f"header: magic {magic!r} version {version}, expected {MAGIC!r} version {VERSION}")
    theirs = (DTYPES.get(dtype_code), tp_rank, tp_size, block_size, num_layers, num_kv_heads, head_dim, got_hash)
    ours = (layout.dtype, layout.tp_rank, layout.tp_size, layout.block_size, layout.num_layers,
            layout.num_kv_heads, layout.head_dim, block_hash)
    if theirs != ours:
        raise BlockFormatError(f"header: {theirs} does not match {ours}")
    if payload_len != layout.payload_bytes or len(value) != HEADER.size + payload_len:
        raise BlockFormatError(f"payload: {len(value) - HEADER.size} bytes, header says {payload_len}, "
                               f"layout needs {layout.payload_bytes}")
    payload = memoryview(value)[HEADER.size:]
    if zlib.crc32(payload) != crc:
        raise ChecksumError(f"payload: CRC32 mismatch for block {block_hash:016x}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only buffer: the tensor is copied before anyone writes
        return torch.frombuffer(payload, dtype=layout.dtype).view(layout.shape)
