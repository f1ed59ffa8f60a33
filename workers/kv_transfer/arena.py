"""Range allocation inside a sender's staging arena (the shm transport's /dev/shm file, the cuda_ipc transport's
device buffer): which byte ranges hold a staged payload and which are free.

    ranges = RangeAllocator(capacity_bytes=1 << 30)
    offset = ranges.allocate(kv_bytes)      # None when no free range is large enough
    ...                                     # copy the payload to arena[offset:offset + kv_bytes]
    ranges.release(offset, kv_bytes)        # after the receiver's ack, or a withdraw

Only offsets are handed out; the arena's memory is the caller's. Not thread-safe: the transport calls it under its
own lock.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

DEFAULT_ALIGN_BYTES = 64 << 10  # page-aligned copies, and a short free list


class RangeAllocator:
    """First fit over [0, capacity_bytes), every range rounded up to a multiple of `align_bytes` (so every offset is
    aligned); released ranges merge with free neighbours.

    First fit takes the lowest free offset, which keeps the high-water mark of used bytes low: the shm arena only
    reserves pages up to it. A `num_bytes` of 0 takes one aligned unit, so every staged payload has its own offset.
    """

    def __init__(self, capacity_bytes: int, align_bytes: int = DEFAULT_ALIGN_BYTES) -> None:
        if align_bytes < 1:
            raise ValueError(f"align_bytes: must be >= 1, got {align_bytes}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes: must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.align_bytes = align_bytes
        usable = capacity_bytes - capacity_bytes % align_bytes  # a tail shorter than one unit is never handed out
        self._free: list[tuple[int, int]] = [(0, usable)] if usable else []  # (offset, num_bytes), sorted, coalesced

    def rounded(self, num_bytes: int) -> int:
        """What a range of `num_bytes` takes: at least one unit, rounded up to a multiple of align_bytes."""
        return -(-max(num_bytes, 1) // self.align_bytes) * self.align_bytes

    def allocate(self, num_bytes: int, reserve: Callable[[int], bool] | None = None) -> int | None:
        """The offset of a free range of `num_bytes` (rounded up), now taken; None if no free range is large
        enough. `reserve(end)`, if given, is called with the end offset of the chosen range before it is taken;
        when it returns False the range stays free and allocate returns None (shm: pages up to `end` could not be
        reserved)."""
        if num_bytes < 0:
            raise ValueError(f"num_bytes: must be >= 0, got {num_bytes}")
        size = self.rounded(num_bytes)
        for i, (offset, free_bytes) in enumerate(self._free):
            if free_bytes >= size:
                if reserve is not None and not reserve(offset + size):
                    return None
                self._free[i:i + 1] = [(offset + size, free_bytes - size)] if free_bytes > size else []
                return offset
        return None

    def release(self, offset: int, num_bytes: int) -> None:
        """Free the range that `allocate(num_bytes)` returned at `offset`. ValueError if that range is not
        aligned, lies outside the arena or overlaps a free range (released twice)."""
        size = self.rounded(num_bytes)
        if offset < 0 or offset % self.align_bytes or offset + size > self.capacity_bytes:
            raise ValueError(f"offset: [{offset}, {offset + size}) is not an allocated range of this arena "
                             f"({self.capacity_bytes} bytes, aligned to {self.align_bytes})")
        i = bisect.bisect_left(self._free, (offset, 0))
        before = self._free[i - 1] if i > 0 else None
        after = self._free[i] if i < len(self._free) else None
        if (before is not None and before[0] + before[1] > offset) or (after is not None and after[0] < offset + size):
            raise ValueError(f"offset: [{offset}, {offset + size}) overlaps a free range: released twice?")
        start, end = offset, offset + size
        if after is not None and after[0] == end:
            end += after[1]
            del self._free[i]
        if before is not None and before[0] + before[1] == start:
            start = before[0]
            i -= 1
            del self._free[i]
        self._free.insert(i, (start, end - start))

    @property
    def free_ranges(self) -> list[tuple[int, int]]:
        """(offset, num_bytes) of each free range, by offset; neighbours are always merged."""
        return list(self._free)

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def used_bytes(self) -> int:
        """Bytes in taken ranges (rounded sizes)."""
        return self.capacity_bytes - self.capacity_bytes % self.align_bytes - self.free_bytes
