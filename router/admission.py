"""Bounded admission: how many requests this router lets wait on each pool at once."""
from __future__ import annotations

import grpc

from router.errors import RouterError


class Admission:
    """Counts, per pool, the requests admitted here that have not yet had their first token from that pool.

    A request is admitted to every pool it will need at once, or to none, so it is never turned away halfway.
    """

    def __init__(self, pools: tuple[str, ...], max_queued: int):
        self.max_queued = max_queued
        self._num_queued = dict.fromkeys(pools, 0)

    def num_queued(self, pool: str) -> int:
        return self._num_queued[pool]

    def admit(self, pools: tuple[str, ...]) -> None:
        for pool in pools:
            if self._num_queued[pool] >= self.max_queued:
                raise RouterError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{pool} pool: {self._num_queued[pool]} requests queued, the limit is "
                    f"max_queued_requests={self.max_queued}; retry later",
                )
        for pool in pools:
            self._num_queued[pool] += 1

    def release(self, pool: str) -> None:
        self._num_queued[pool] -= 1
