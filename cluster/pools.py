"""What a pool has at one moment, as the controller (or the RayCluster) reports it to the autoscaler.

Kept free of ray and grpc so that the autoscaler's policy imports it alone.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolReplicas:
    """One pool's workers. desired: the size it is set to (the controller's target, the RayCluster worker group's
    replicas); ready: serving; starting: asked for and not ready yet (pending pods included); draining: leaving,
    taking no new requests, still holding their devices."""
    desired: int
    ready: int = 0
    starting: int = 0
    draining: int = 0
