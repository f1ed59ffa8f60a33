"""KV transfer over TCP: the kv tensor's bytes go straight from the sender's tensor memory to the socket and from
the socket into the receiver's new tensor; no pickling, no intermediate copies. See wire.py for the protocol.
With a TLSConfig (tandem/tls.py) every connection is mutual TLS: the sender requires a client certificate signed by
the cluster CA, the receiver verifies the sender's certificate against the endpoint's host (or its server_name).

Threads, sender side: one accept thread, and one thread per open connection (each connection serves one fetch at a
time, so concurrent fetches use separate connections). Receiver side: `fetch` runs on the caller's thread and keeps
the connection for the next fetch from the same endpoint; the commits of one-sided reads (a subclass's
`_read_direct`: shm) go out from one background thread, in the order the reads finished.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from workers.kv.handoff import KVPayload
from workers.kv_transfer.base import KVTransferError, KVTransport, WarmBuffers, byte_view
from workers.kv_transfer.wire import (
    PeerClosed, payload_from_header, payload_header, recv_exact, recv_exact_into, recv_frame, send_body,
    send_frame, token_bytes_len,
)

if TYPE_CHECKING:
    from tandem.tls import TLSConfig

log = logging.getLogger(__name__)

_NUM_REMEMBERED_IDS = 4096  # fetched / withdrawn ids kept to say why a later fetch of one fails
_MAX_PENDING_COMMITS = 1024  # receiver side; past this a commit is dropped and the sender's lease frees the payload
_COMMIT_TIMEOUT_S = 10.0


@dataclasses.dataclass
class Staged:
    """A payload waiting to be fetched, with its header built once at offer time."""

    header: dict
    token_bytes: bytes
    num_bytes: int
    kv: torch.Tensor | None  # contiguous CPU kv to send inline; None when it waits elsewhere (shm: in the arena)
    in_flight: bool = False  # a connection is sending it: a second fetch is refused rather than served twice
    shm_range: tuple[int, int] | None = None  # shm: (offset, num_bytes) of the staged range in the sender's arena
    # One-sided reads: what offer() returns, and the generation a "commit" must name (a reused id is a new one).
    locator: str | None = None
    generation: int = 0
    committed: bool = False  # a receiver acknowledged every byte (else: withdrawn, or dropped by close)


class TcpKVTransport(KVTransport):
    name = "tcp"
    # The sender drops a connection whose receiver neither reads nor acknowledges for this long.
    STALL_TIMEOUT_S = 30.0
    MAX_IDLE_CONNECTIONS = 4  # receiver side, per endpoint

    def __init__(self, tls: TLSConfig | None = None) -> None:
        super().__init__()
        self.tls = tls
        self._server_ssl = tls.server_ssl_context() if tls is not None else None
        self._client_ssl = tls.client_ssl_context() if tls is not None else None
        self._lock = threading.Lock()
        self._staged: dict[str, Staged] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()  # transfer_id -> "fetched" | "withdrawn"
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._server_conns: set[socket.socket] = set()
        self._endpoint: str | None = None
        self._closed = False
        self._idle: dict[str, list[socket.socket]] = {}  # receiver side: endpoint -> pooled connections
        self._commits: queue.Queue | None = None  # receiver side: (endpoint, transfer_id, generation) to commit
        self.receive_buffers = WarmBuffers()  # receiver side: where fetched kv bytes land

    # --- sender side ------------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1") -> str:
        with self._lock:
            self._check_startable()
            listener = socket.create_server((host, 0), family=_family(host), backlog=128)
            port = listener.getsockname()[1]
            # A wildcard address is no use to a peer: advertise this host's name instead.
            advertised = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
            self._endpoint = f"[{advertised}]:{port}" if ":" in advertised else f"{advertised}:{port}"
            self._listener = listener
            self._accept_thread = threading.Thread(target=self._accept_loop, args=(listener,),
                                                   name=f"kv-{self.name}-accept", daemon=True)
            self._accept_thread.start()
            return self._endpoint

    def _check_startable(self) -> None:
        """Raise unless start() may run: once per transport, not after close(). Call with the lock held."""
        if self._closed or self._listener is not None:
            state = "closed" if self._closed else f"already serving at {self._endpoint}"
            raise KVTransferError(f"{self.name} transport: start() on a transport that is {state}")

    @property
    def endpoint(self) -> str | None:
        return self._endpoint

    def offer(self, transfer_id: str, payload: KVPayload) -> str | None:
        staged = self._stage(transfer_id, payload)
        with self._lock:
            problem = ("the transport is closed" if self._closed else
                       "the transport is not serving (call start() first)" if self._listener is None else None)
            if problem is None and transfer_id not in self._staged:
                self._staged[transfer_id] = staged
                self._finished.pop(transfer_id, None)
                return staged.locator
        self._unstage(staged)
        if problem is not None:
            raise KVTransferError(f"offer of transfer {transfer_id!r}: {problem}")
        raise ValueError(f"transfer_id: {transfer_id!r} is already staged")

    def withdraw(self, transfer_id: str) -> bool:
        with self._lock:
            staged = self._staged.pop(transfer_id, None)
            if staged is not None:
                self._remember(transfer_id, "withdrawn")
        if staged is None:
            return False
        self._unstage(staged)
        return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._endpoint = None
            staged, self._staged = list(self._staged.values()), {}
            listener, conns = self._listener, list(self._server_conns)
            idle, self._idle = self._idle, {}
            commits = self._commits
        if commits is not None:
            commits.put(None)  # the committer sends what is queued before it, then stops
        # shutdown() wakes a thread blocked in accept() or recv() on the socket; that thread then closes it.
        for sock in ([listener] if listener is not None else []) + conns:
            _shutdown(sock)
        for socks in idle.values():
            for sock in socks:
                sock.close()
        for item in staged:
            self._unstage(item)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5.0)

    def _accept_loop(self, listener: socket.socket) -> None:
        with listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # close() shut the listener down
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    if self._closed:
                        conn.close()
                        return
                    self._server_conns.add(conn)
                threading.Thread(target=self._serve_connection, args=(conn,), name=f"kv-{self.name}-conn",
                                 daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            if self._server_ssl is not None:
                conn = self._handshake(conn)
            while True:
                conn.settimeout(None)  # an idle pooled connection may wait for its next request indefinitely
                request = recv_frame(conn)
                op, transfer_id = request.get("op"), request.get("transfer_id")
                if op not in ("fetch", "commit") or not isinstance(transfer_id, str):
                    raise ConnectionError(f"unexpected request {request!r}")
                conn.settimeout(self.STALL_TIMEOUT_S)  # from here on, a receiver that stops reading is dropped
                if op == "fetch":
                    self._serve_fetch(conn, transfer_id)
                else:
                    self._serve_commit(conn, transfer_id, request.get("generation"))
        except (OSError, ValueError) as e:  # the receiver left (the usual end of a pooled connection) or failed
            log.debug("kv %s: connection closed: %s", self.name, e)
        except Exception:
            log.exception("kv %s: connection handler failed", self.name)
        finally:
            with self._lock:
                self._server_conns.discard(conn)
            conn.close()

    def _handshake(self, conn: socket.socket) -> socket.socket:
        """The TLS server side of a new connection (bounded by STALL_TIMEOUT_S); it replaces `conn` in the set
        close() shuts down. A peer without a certificate the cluster CA signed fails here (ssl.SSLError)."""
        conn.settimeout(self.STALL_TIMEOUT_S)
        try:
            tls_conn = self._server_ssl.wrap_socket(conn, server_side=True)  # detaches `conn`
        except ssl.SSLError as e:
            log.warning("kv %s: refused a connection that failed the TLS handshake: %s", self.name, e)
            raise
        with self._lock:
            self._server_conns.discard(conn)
            if self._closed:
                tls_conn.close()
                raise ConnectionError("the transport closed during the TLS handshake")
            self._server_conns.add(tls_conn)
        return tls_conn

    def _serve_fetch(self, conn: socket.socket, transfer_id: str) -> None:
        with self._lock:
            staged = self._staged.get(transfer_id)
            if staged is None:
                error = (f"transfer {transfer_id!r} was {self._finished[transfer_id]}"
                         if transfer_id in self._finished else f"unknown transfer {transfer_id!r}")
            elif staged.in_flight:
                error = f"transfer {transfer_id!r} is already being fetched"
            else:
                error = None
                staged.in_flight = True
        if error is not None:
            send_frame(conn, {"ok": False, "error": error})
            return
        try:
            send_frame(conn, staged.header)
            conn.sendall(staged.token_bytes)
            self._send_kv(conn, staged)
            ack = recv_frame(conn)
            if ack != {"op": "ack", "transfer_id": transfer_id}:
                raise ConnectionError(f"expected the ack of {transfer_id!r}, got {ack!r}")
        except BaseException:
            # The receiver died, stalled or misbehaved: the payload stays staged for another try or a withdraw.
            with self._lock:
                staged.in_flight = False
            raise
        if not self._commit(transfer_id, staged):
            send_frame(conn, {"ok": False, "error": f"transfer {transfer_id!r} was withdrawn during the transfer"})
            return
        send_frame(conn, {"ok": True})
        self._finish_commit(transfer_id, staged)

    def _serve_commit(self, conn: socket.socket, transfer_id: str, generation) -> None:
        """A receiver read the payload one-sided and holds every byte: drop it as an acknowledged fetch would."""
        with self._lock:
            staged = self._staged.get(transfer_id)
        if staged is None or staged.generation != generation or not self._commit(transfer_id, staged):
            # Withdrawn (its lease ran out), or an older payload under a reused id: the receiver's copy stands anyway.
            send_frame(conn, {"ok": False, "error": f"transfer {transfer_id!r} is no longer staged"})
            return
        send_frame(conn, {"ok": True})
        self._finish_commit(transfer_id, staged)

    def _commit(self, transfer_id: str, staged: Staged) -> bool:
        """Take `staged` out of the staged set as fetched; False if it was withdrawn (or replaced) meanwhile."""
        with self._lock:
            committed = self._staged.get(transfer_id) is staged
            if committed:
                del self._staged[transfer_id]
                self._remember(transfer_id, "fetched")
                staged.committed = True
        return committed

    def _finish_commit(self, transfer_id: str, staged: Staged) -> None:
        self._unstage(staged)
        self._stats.add_sent(staged.num_bytes)
        if self.on_fetched is not None:
            try:
                self.on_fetched(transfer_id)
            except Exception:
                log.exception("kv %s: on_fetched(%r) raised", self.name, transfer_id)

    def _remember(self, transfer_id: str, outcome: str) -> None:
        """Record why `transfer_id` is gone (call with the lock held)."""
        self._finished[transfer_id] = outcome
        self._finished.move_to_end(transfer_id)
        if len(self._finished) > _NUM_REMEMBERED_IDS:
            self._finished.popitem(last=False)

    # --- receiver side ----------------------------------------------------------------------------------

    def fetch(self, endpoint: str, transfer_id: str, timeout_s: float, locator: str | None = None) -> KVPayload:
        start = time.monotonic()
        deadline = start + timeout_s
        what = f"{self.name} fetch of transfer {transfer_id!r} from {endpoint}"
        if locator:
            try:
                payload, generation = self._read_direct(locator, deadline)
            except TimeoutError:
                raise KVTransferError(f"{what}: timed out after {timeout_s:g} s") from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise KVTransferError(f"{what}: {type(e).__name__}: {e}") from e
            self._stats.add_received(payload.num_bytes, time.monotonic() - start)
            self._queue_commit(endpoint, transfer_id, generation)
            return payload
        sock = None
        try:
            sock, header = self._request(endpoint, {"op": "fetch", "transfer_id": transfer_id}, deadline)
            if not header.get("ok"):
                self._release_connection(endpoint, sock)
                sock = None
                raise KVTransferError(f"{what}: {header.get('error')}")
            token_bytes = recv_exact(sock, token_bytes_len(header), deadline)
            kv_bytes = self._recv_kv(sock, header, deadline)
            send_frame(sock, {"op": "ack", "transfer_id": transfer_id}, deadline)
            confirm = recv_frame(sock, deadline)
            self._release_connection(endpoint, sock)
            sock = None
            if not confirm.get("ok"):
                raise KVTransferError(f"{what}: {confirm.get('error')}")
            payload = payload_from_header(header, token_bytes, kv_bytes)
        except TimeoutError:
            raise KVTransferError(f"{what}: timed out after {timeout_s:g} s") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KVTransferError(f"{what}: {type(e).__name__}: {e}") from e
        finally:
            if sock is not None:
                sock.close()
        self._stats.add_received(payload.num_bytes, time.monotonic() - start)
        return payload

    def _request(self, endpoint: str, request: dict, deadline: float) -> tuple[socket.socket, dict]:
        """Send `request` on a pooled or new connection; return it with the reply (a fetch's: the header)."""
        with self._lock:
            pooled = self._idle.get(endpoint)
            sock = pooled.pop() if pooled else None
        if sock is not None:
            try:
                send_frame(sock, request, deadline)
                return sock, recv_frame(sock, deadline)
            except (PeerClosed, ConnectionResetError, BrokenPipeError):
                sock.close()  # the sender closed this idle connection (it restarted or closed): try a new one
            except BaseException:
                sock.close()
                raise
        sock = _connect(endpoint, deadline, self._client_ssl, self.tls)
        try:
            send_frame(sock, request, deadline)
            return sock, recv_frame(sock, deadline)
        except BaseException:
            sock.close()
            raise

    def _read_direct(self, locator: str, deadline: float) -> tuple[KVPayload, int]:
        """Read a payload one-sided from what `offer` returned; return it with its generation. Transports that
        can (shm) override this; ValueError for a locator this transport does not read."""
        raise ValueError(f"the {self.name} transport reads no locator (got {locator[:40]!r})")

    def _queue_commit(self, endpoint: str, transfer_id: str, generation: int) -> None:
        with self._lock:
            if self._closed:
                return
            if self._commits is None:
                self._commits = queue.Queue(_MAX_PENDING_COMMITS)
                threading.Thread(target=self._commit_loop, args=(self._commits,), name=f"kv-{self.name}-commit",
                                 daemon=True).start()
            commits = self._commits
        try:
            commits.put_nowait((endpoint, transfer_id, generation))
        except queue.Full:
            log.warning("kv %s: %d commits pending; dropped that of %r (the sender frees it when its lease ends)",
                        self.name, _MAX_PENDING_COMMITS, transfer_id)

    def _commit_loop(self, commits: queue.Queue) -> None:
        """Tell each sender, in turn, that a payload read one-sided has arrived, so that it frees it now rather
        than when its lease runs out. A failure costs the sender only that wait: logged, not raised."""
        for endpoint, transfer_id, generation in iter(commits.get, None):
            sock = None
            try:
                deadline = time.monotonic() + _COMMIT_TIMEOUT_S
                sock, reply = self._request(endpoint, {"op": "commit", "transfer_id": transfer_id,
                                                       "generation": generation}, deadline)
                self._release_connection(endpoint, sock)
                sock = None
                if not reply.get("ok"):
                    log.debug("kv %s: commit of %r at %s: %s", self.name, transfer_id, endpoint, reply.get("error"))
            except Exception as e:
                log.warning("kv %s: commit of %r at %s failed: %s: %s", self.name, transfer_id, endpoint,
                            type(e).__name__, e)
            finally:
                if sock is not None:
                    sock.close()

    def _release_connection(self, endpoint: str, sock: socket.socket) -> None:
        """Keep a connection that stands at a frame boundary for the next fetch from `endpoint`."""
        with self._lock:
            pooled = self._idle.setdefault(endpoint, [])
            if not self._closed and len(pooled) < self.MAX_IDLE_CONNECTIONS:
                pooled.append(sock)
                return
        sock.close()

    # --- how the kv bytes move (the shm transport overrides these) ---------------------------------------

    def _stage(self, transfer_id: str, payload: KVPayload) -> Staged:
        # No copy for a contiguous CPU tensor: the caller must leave it unmodified until it is fetched or withdrawn.
        kv = payload.kv.detach().cpu().contiguous()
        header, token_bytes = payload_header(payload)
        return Staged(header, token_bytes, payload.num_bytes, kv)

    def _unstage(self, staged: Staged) -> None:
        """Release what `_stage` took. Called exactly once per staged payload."""

    def _send_kv(self, conn: socket.socket, staged: Staged) -> None:
        if staged.kv is not None:
            send_body(conn, byte_view(staged.kv), self.STALL_TIMEOUT_S)

    def _recv_kv(self, sock: socket.socket, header: dict, deadline: float) -> torch.Tensor:
        """The kv's raw bytes as a uint8 CPU tensor of its own (from `receive_buffers`)."""
        for other in ("shm", "nixl", "cuda_ipc"):
            if other in header:
                raise ValueError(f"the sender uses the {other} transport: fetch with make_kv_transport('{other}')")
        kv_bytes = self.receive_buffers.take(header["kv_nbytes"])
        recv_exact_into(sock, byte_view(kv_bytes), deadline)
        return kv_bytes

    # --- yardstick -------------------------------------------------------------------------------------

    @staticmethod
    def measure_raw_bandwidth(nbytes: int = 64 << 20, repeats: int = 3) -> float:
        """Loopback TCP between this process and a child: the child sends `nbytes` per request with sendall, this
        side recv_into's a reused buffer; no framing, no allocation."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            child = subprocess.Popen([sys.executable, "-c", _RAW_SENDER, str(port), str(nbytes)])
            try:
                listener.settimeout(30.0)
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(60.0)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    view = memoryview(bytearray(nbytes))
                    best_s = float("inf")
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        conn.sendall(b"g")
                        recv_exact_into(conn, view)
                        best_s = min(best_s, time.perf_counter() - t0)
            finally:
                child.kill()
                child.wait()
        return nbytes / best_s


# The child of measure_raw_bandwidth: plain Python, so it starts in milliseconds (no torch import).
_RAW_SENDER = """
import socket, sys
port, nbytes = int(sys.argv[1]), int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
data = memoryview(bytearray(nbytes))
while sock.recv(1):
    sock.sendall(data)
"""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _connect(endpoint: str, deadline: float, ssl_context=None, tls: TLSConfig | None = None) -> socket.socket:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not host:port")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=remaining)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is not None:
        try:  # the handshake runs under the socket's timeout: the fetch's remaining time
            sock = ssl_context.wrap_socket(sock, server_hostname=tls.server_hostname(host))
        except BaseException:
            sock.close()
            raise
    return sock


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also for a TLS socket: its own would drop the TLS state under a reader.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (a listener on some systems) or already closed
