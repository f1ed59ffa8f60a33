"""The staging arenas' range allocator: aligned first fit, ranges that never overlap, and every released byte
usable again (neighbours merge, so a full-size payload fits once the arena drains). And the receivers' warm
buffers cut from it: a range is reused only once nothing views it."""
from __future__ import annotations

import random

import pytest
import torch

from workers.kv_transfer.arena import RangeAllocator
from workers.kv_transfer.base import WarmBuffers

KIB = 1 << 10


def test_first_fit_hands_out_aligned_ranges_from_the_lowest_offset():
    ranges = RangeAllocator(1 << 20, align_bytes=64 * KIB)
    assert ranges.allocate(1) == 0
    assert ranges.allocate(64 * KIB) == 64 * KIB
    assert ranges.allocate(64 * KIB + 1) == 128 * KIB  # takes two units
    assert ranges.allocate(0) == 256 * KIB  # an empty payload still gets its own offset
    assert ranges.used_bytes == 320 * KIB
    ranges.release(64 * KIB, 64 * KIB)
    assert ranges.allocate(10) == 64 * KIB, "the lowest hole is reused first"


def test_a_payload_that_does_not_fit_gets_none_and_takes_nothing():
    ranges = RangeAllocator(256 * KIB, align_bytes=64 * KIB)
    assert ranges.allocate(300 * KIB) is None
    assert ranges.allocate(192 * KIB) == 0
    assert ranges.allocate(65 * KIB) is None  # 64 KiB left
    assert ranges.free_ranges == [(192 * KIB, 64 * KIB)]


def test_released_neighbours_merge_so_the_whole_arena_fits_again():
    ranges = RangeAllocator(1 << 20, align_bytes=64 * KIB)
    offsets = [ranges.allocate(100 * KIB) for _ in range(5)]  # 128 KiB each
    assert offsets == [0, 128 * KIB, 256 * KIB, 384 * KIB, 512 * KIB]
    ranges.release(offsets[1], 100 * KIB)
    ranges.release(offsets[3], 100 * KIB)
    assert ranges.allocate(200 * KIB) == 640 * KIB, "two separate 128 KiB holes do not make 256 KiB"
    ranges.release(offsets[2], 100 * KIB)  # joins both holes
    assert ranges.free_ranges == [(128 * KIB, 384 * KIB), (896 * KIB, 128 * KIB)]
    for offset in (offsets[0], offsets[4], 640 * KIB):
        ranges.release(offset, 200 * KIB if offset == 640 * KIB else 100 * KIB)
    assert ranges.free_ranges == [(0, 1 << 20)]
    assert ranges.allocate(1 << 20) == 0


def test_a_tail_shorter_than_one_unit_is_never_handed_out():
    ranges = RangeAllocator(100 * KIB, align_bytes=64 * KIB)
    assert ranges.allocate(1) == 0
    assert ranges.allocate(1) is None
    assert RangeAllocator(10, align_bytes=64 * KIB).allocate(1) is None


def test_release_refuses_ranges_that_are_not_taken():
    ranges = RangeAllocator(1 << 20, align_bytes=64 * KIB)
    offset = ranges.allocate(64 * KIB)
    ranges.release(offset, 64 * KIB)
    with pytest.raises(ValueError, match="released twice"):
        ranges.release(offset, 64 * KIB)
    with pytest.raises(ValueError, match="not an allocated range"):
        ranges.release(KIB, 10)  # unaligned
    with pytest.raises(ValueError, match="not an allocated range"):
        ranges.release(960 * KIB, 128 * KIB)  # past the end
    taken = ranges.allocate(128 * KIB)
    with pytest.raises(ValueError, match="released twice"):
        ranges.release(taken + 64 * KIB, 128 * KIB)  # overlaps the free range after it
    assert ranges.free_ranges == [(128 * KIB, 896 * KIB)]


def test_reserve_is_asked_for_the_end_and_a_refusal_takes_nothing():
    asked = []
    ranges = RangeAllocator(1 << 20, align_bytes=64 * KIB)
    assert ranges.allocate(100 * KIB, reserve=lambda end: asked.append(end) or True) == 0
    assert ranges.allocate(10, reserve=lambda end: asked.append(end) or False) is None
    assert asked == [128 * KIB, 192 * KIB]
    assert ranges.free_ranges == [(128 * KIB, 896 * KIB)]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="align_bytes"):
        RangeAllocator(1 << 20, align_bytes=0)
    with pytest.raises(ValueError, match="capacity_bytes"):
        RangeAllocator(-1)
    with pytest.raises(ValueError, match="num_bytes"):
        RangeAllocator(1 << 20).allocate(-1)


def test_random_allocations_never_overlap_and_account_for_every_byte():
    rng = random.Random(7)
    align, capacity = 4 * KIB, 1 << 20
    ranges = RangeAllocator(capacity, align_bytes=align)
    taken: dict[int, int] = {}  # offset -> num_bytes
    for _ in range(3000):
        if taken and rng.random() < 0.45:
            offset = rng.choice(list(taken))
            ranges.release(offset, taken.pop(offset))
        else:
            num_bytes = rng.randrange(0, 64 * KIB)
            offset = ranges.allocate(num_bytes)
            if offset is None:
                assert all(n < ranges.rounded(num_bytes) for _, n in ranges.free_ranges)
                continue
            assert offset % align == 0 and offset + num_bytes <= capacity
            taken[offset] = num_bytes
        spans = sorted((o, o + ranges.rounded(n)) for o, n in taken.items())
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "ranges overlap"
        assert ranges.used_bytes == sum(end - start for start, end in spans)
        free = ranges.free_ranges
        assert all(a + n < b for (a, n), (b, _) in zip(free, free[1:])), "free neighbours were not merged"
    for offset, num_bytes in taken.items():
        ranges.release(offset, num_bytes)
    assert ranges.free_ranges == [(0, capacity)]


# --- WarmBuffers: the receivers' pool --------------------------------------------------------------------


def test_warm_buffers_reuse_a_range_only_once_every_view_of_it_is_gone():
    buffers = WarmBuffers(capacity_bytes=8 << 20)
    first = buffers.take(3 << 20)
    first.fill_(7)
    kv = first.view(torch.float32).view(4, -1)  # what payload_from_header makes of it
    first_ptr = first.data_ptr()
    del first
    assert buffers.used_bytes == 4 << 20, "a view still uses the range"
    second = buffers.take(3 << 20)
    assert second.data_ptr() != first_ptr
    second.fill_(9)
    assert torch.equal(kv.view(torch.uint8).reshape(-1), torch.full((3 << 20,), 7, dtype=torch.uint8))
    del kv
    assert buffers.used_bytes == 4 << 20
    third = buffers.take(3 << 20)
    assert third.data_ptr() == first_ptr, "a freed range was not reused"
    assert third.numel() == 3 << 20 and second.numel() == 3 << 20


def test_warm_buffers_fall_back_to_fresh_memory_when_full():
    buffers = WarmBuffers(capacity_bytes=4 << 20)
    held = buffers.take(3 << 20)
    extra = buffers.take(3 << 20)  # no room left in the pool
    too_big = buffers.take(16 << 20)
    assert extra.numel() == 3 << 20 and too_big.numel() == 16 << 20
    assert buffers.used_bytes == 4 << 20
    extra.fill_(1)
    too_big.fill_(2)
    del held
    assert buffers.used_bytes == 0
    assert buffers.take(0).numel() == 0
