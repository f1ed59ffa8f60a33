"""The registry actuator: sizes the pools of a running controller (`tandem up`, `tandem controller`) through its
registry's `ScalePool` and `GetPools` RPCs, from another process (`tandem autoscaler --actuator registry`)."""
from __future__ import annotations

import grpc

from cluster.pools import PoolReplicas


class RegistryActuator:
    """address: the controller's registry (host:port); tls: the cluster's internal TLS (TLSConfig) or None."""

    def __init__(self, address: str, tls=None, timeout_s: float = 5.0):
        from tandem import tls as tandem_tls
        from tandem.v1 import worker_pb2_grpc

        self._channel = tandem_tls.channel(address, tls)
        self._stub = worker_pb2_grpc.RegistryStub(self._channel)
        self._timeout_s = timeout_s

    def observe(self) -> dict[str, PoolReplicas]:
        from tandem.v1 import worker_pb2 as wpb

        return _pools(self._stub.GetPools(wpb.GetPoolsRequest(), timeout=self._timeout_s))

    def scale(self, role: str, replicas: int) -> None:
        """Raises ValueError with the controller's message when it refuses the size (INVALID_ARGUMENT)."""
        from tandem.v1 import worker_pb2 as wpb

        try:
            self._stub.ScalePool(wpb.ScalePoolRequest(role=role, replicas=replicas), timeout=self._timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from None
            raise

    def close(self) -> None:
        self._channel.close()


def _pools(resp) -> dict[str, PoolReplicas]:
    return {p.role: PoolReplicas(p.desired, p.ready, p.starting, p.draining) for p in resp.pools}
