"""The worker registry: which workers are live and where they listen. Served over gRPC (`tandem.v1.Registry`)
so that routers need no Ray handles; they poll ListWorkers.

It also takes pool sizes and drains from remote actuators (ScalePool, GetPools, DrainWorker: an autoscaler in
another pod, a worker pod's preStop hook) and passes them to its `control`, the controller."""
from __future__ import annotations

import threading
from concurrent import futures
from typing import Protocol

import grpc

from cluster.pools import PoolReplicas
from tandem.tls import TLSConfig, add_port
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc

# ScalePool's bound on one pool's size: a typo (or an unsigned wrap-around) must not launch millions of actors.
MAX_POOL_REPLICAS = 1024


class NotResizable(RuntimeError):
    """The pools' sizes come from elsewhere (the controller follows the Ray nodes): ScalePool is refused."""


class PoolControl(Protocol):
    """What the registry's pool RPCs act on (cluster.controller.Controller)."""

    def pool_status(self) -> dict[str, PoolReplicas]:
        ...

    def scale_pool(self, role: str, replicas: int) -> None:
        """ValueError naming the argument for a bad role or size; NotResizable when sizes come from elsewhere."""

    def drain_workers(self, worker_id: str = "", node_ip: str = "", wait: bool = False) -> list[str]:
        """ValueError without a target; LookupError naming it when nothing matches."""


class WorkerRegistry(worker_pb2_grpc.RegistryServicer):
    def __init__(self, control: PoolControl | None = None):
        self._lock = threading.Lock()
        self._workers: dict[str, wpb.WorkerInfo] = {}
        self.version = 0
        self._server: grpc.Server | None = None
        self.address: str | None = None
        self.control = control

    def add(self, info: wpb.WorkerInfo) -> None:
        with self._lock:
            self._workers[info.worker_id] = info
            self.version += 1

    def remove(self, worker_id: str) -> None:
        with self._lock:
            if self._workers.pop(worker_id, None) is not None:
                self.version += 1

    def workers(self) -> list[wpb.WorkerInfo]:
        with self._lock:
            return list(self._workers.values())

    # --- tandem.v1.Registry -----------------------------------------------------------------------------

    def ListWorkers(self, request, context) -> wpb.ListWorkersResponse:
        with self._lock:
            return wpb.ListWorkersResponse(workers=list(self._workers.values()), version=self.version)

    def GetPools(self, request, context) -> wpb.PoolsResponse:
        return _pools_response(self._control(context).pool_status())

    def ScalePool(self, request: wpb.ScalePoolRequest, context) -> wpb.PoolsResponse:
        control = self._control(context)
        if request.replicas > MAX_POOL_REPLICAS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"replicas: must be between 0 and {MAX_POOL_REPLICAS}, got {request.replicas}")
        try:
            control.scale_pool(request.role, request.replicas)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except NotResizable as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return _pools_response(control.pool_status())

    def DrainWorker(self, request: wpb.DrainWorkerRequest, context) -> wpb.DrainWorkerResponse:
        control = self._control(context)
        try:
            drained = control.drain_workers(worker_id=request.worker_id, node_ip=request.node_ip, wait=request.wait)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except LookupError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        return wpb.DrainWorkerResponse(worker_ids=drained)

    def _control(self, context) -> PoolControl:
        if self.control is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this registry has no controller to size pools")
        return self.control

    # --- serving ----------------------------------------------------------------------------------------

    def serve(self, host: str, port: int = 0, tls: TLSConfig | None = None) -> str:
        # Threads: DrainWorker(wait=True) holds one until its workers stop.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tandem-registry"))
        worker_pb2_grpc.add_RegistryServicer_to_server(self, self._server)
        bound = add_port(self._server, f"{host}:{port}", tls)
        if bound == 0:
            raise OSError(f"registry_port: cannot listen on {host}:{port}")
        self._server.start()
        self.address = f"{host}:{bound}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0.5).wait(5)
            self._server = None


def _pools_response(pools: dict[str, PoolReplicas]) -> wpb.PoolsResponse:
    return wpb.PoolsResponse(pools=[
        wpb.PoolReplicas(role=role, desired=p.desired, ready=p.ready, starting=p.starting, draining=p.draining)
        for role, p in pools.items()])
