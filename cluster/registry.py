"""The worker registry: which workers are live and where they listen. Served over gRPC (`tandem.v1.Registry`)
so that routers need no Ray handles; they poll ListWorkers."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc

from tandem.tls import TLSConfig, add_port
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc


class WorkerRegistry(worker_pb2_grpc.RegistryServicer):
    def __init__(self):
        self._lock = threading.Lock()
        self._workers: dict[str, wpb.WorkerInfo] = {}
        self.version = 0
        self._server: grpc.Server | None = None
        self.address: str | None = None

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

    def ListWorkers(self, request, context) -> wpb.ListWorkersResponse:
        with self._lock:
            return wpb.ListWorkersResponse(workers=list(self._workers.values()), version=self.version)

    def serve(self, host: str, port: int = 0, tls: TLSConfig | None = None) -> str:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tandem-registry"))
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
