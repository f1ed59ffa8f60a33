"""The cuda_ipc KV transport: between two processes on one GPU a payload lands on the receiver's GPU bit for bit,
at most once, through the sender's device arena (whose ranges are reused once acknowledged) or inline over tcp when
it does not fit; without CUDA, selecting it is refused by name. (The contract tests every transport passes, cuda_ipc
included, are in test_kv_transfer.py and test_kv_transfer_tls.py.)"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
import socket
import time

import pytest
import torch

from cluster.config import ClusterConfig
from tests.workers.test_kv_transfer import Sender, assert_same_payload, make_payload
from workers.kv_transfer import KVTransferError, cuda_ipc, make_kv_transport
from workers.kv_transfer.cuda_ipc import CudaIpcKVTransport
from workers.kv_transfer.wire import recv_frame, send_frame

# --- without CUDA ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_selecting_cuda_ipc_without_cuda_names_the_alternatives():
    with pytest.raises(ValueError, match=r"^kv_transport: 'cuda_ipc' needs a CUDA device.*use 'shm' or 'tcp'"):
        make_kv_transport("cuda_ipc")
    with pytest.raises(ValueError, match=r"^kv_transport: 'cuda_ipc' needs a CUDA device"):
        CudaIpcKVTransport.measure_raw_bandwidth(1 << 20)


def test_a_cluster_without_cuda_refuses_cuda_ipc_before_any_worker_starts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^kv_transport: 'cuda_ipc' needs a CUDA device"):
        ClusterConfig(kv_transport="cuda_ipc")
    assert ClusterConfig(kv_transport="shm").resolved_kv_transport == "shm"  # the others are unaffected


# --- the protocol on the CPU, CUDA stubbed out -----------------------------------------------------------


@pytest.fixture
def stubbed_cuda(monkeypatch):
    """cuda_ipc with its CUDA calls replaced: arenas are CPU tensors, "exporting" one files it under its id and
    "opening" it looks it up (a receiver in this process then takes the path another process would). Returns the
    ids opened, in order."""
    exported, opened = {}, []

    def export(arena):
        arena_id = f"arena-{len(exported)}"
        exported[arena_id] = arena
        return {"arena": arena_id, "arena_bytes": arena.numel(), "device": 0, "device_uuid": None}

    def open_arena(region):
        opened.append(region["arena"])
        return exported[region["arena"]]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: None)
    monkeypatch.setattr(cuda_ipc, "current_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cuda_ipc, "wait_for_stream", lambda device: None)
    monkeypatch.setattr(cuda_ipc, "export_arena", export)
    monkeypatch.setattr(cuda_ipc, "open_arena", open_arena)
    monkeypatch.setattr(cuda_ipc, "_OWN_ARENAS", {})  # start() files its arena here; the tests take it out again
    return opened


def test_ranges_inline_overflow_and_the_mapping_cache_with_cuda_stubbed(stubbed_cuda):
    sender, receiver = CudaIpcKVTransport(arena_bytes=1 << 20), CudaIpcKVTransport()
    fetched = queue.Queue()
    sender.on_fetched = fetched.put
    try:
        endpoint = sender.start()
        cuda_ipc._OWN_ARENAS.clear()  # as if the receiver were another process
        small, big = make_payload("small", "bfloat16", num_blocks=8), make_payload("big", num_blocks=2048)  # 2 MiB
        sender.offer("small", small)
        sender.offer("big", big)
        offset = sender._staged["small"].header["cuda_ipc"]["offset"]
        assert "cuda_ipc" not in sender._staged["big"].header, "a payload larger than the arena goes inline"
        assert_same_payload(receiver.fetch(endpoint, "small", timeout_s=5), small)
        assert_same_payload(receiver.fetch(endpoint, "big", timeout_s=5), big)
        assert sorted(fetched.get(timeout=5) for _ in range(2)) == ["big", "small"]
        again = make_payload("again")
        sender.offer("again", again)
        assert sender._staged["again"].header["cuda_ipc"]["offset"] == offset, "the acknowledged range is reused"
        assert_same_payload(receiver.fetch(endpoint, "again", timeout_s=5), again)
        with pytest.raises(KVTransferError, match="'again' was fetched"):
            receiver.fetch(endpoint, "again", timeout_s=5)
        assert stubbed_cuda == ["arena-0"], "the arena is mapped once and kept across fetches and refusals"
        sender.offer("withdrawn", small)
        assert sender.withdraw("withdrawn")
        with pytest.raises(KVTransferError, match="'withdrawn' was withdrawn"):
            receiver.fetch(endpoint, "withdrawn", timeout_s=5)
        assert sender._ranges.free_ranges == [(0, 1 << 20)], "every range came back"
        sender.offer("left", small)
        sender.close()
        with pytest.raises(KVTransferError, match="refused"):
            receiver.fetch(endpoint, "left", timeout_s=5)
        assert receiver._mapped == {}, "a sender that is gone has its arena dropped"
    finally:
        sender.close()
        receiver.close()


def test_a_range_outside_the_senders_arena_is_refused_and_the_payload_stays(stubbed_cuda):
    sender, receiver = CudaIpcKVTransport(arena_bytes=1 << 20), CudaIpcKVTransport()
    try:
        endpoint = sender.start()
        cuda_ipc._OWN_ARENAS.clear()
        want = make_payload("x")
        sender.offer("x", want)
        region = sender._staged["x"].header["cuda_ipc"]
        region["offset"] += 1 << 30
        with pytest.raises(KVTransferError, match="lies outside the sender's arena"):
            receiver.fetch(endpoint, "x", timeout_s=5)
        region["offset"] -= 1 << 30
        assert_same_payload(fetch_when_back(receiver, endpoint, "x"), want)
    finally:
        receiver.close()
        sender.close()


# --- a receiving process --------------------------------------------------------------------------------


def receiver_main(commands: mp.Queue, replies: mp.Queue) -> None:
    """A decode worker's side: run ("fetch", endpoint, transfer_id) from the test; reply ("ok", device type, payload
    with its kv copied to the CPU) or ("error", message)."""
    transport = make_kv_transport("cuda_ipc")
    replies.put("ready")
    for _, endpoint, transfer_id in iter(commands.get, None):
        try:
            payload = transport.fetch(endpoint, transfer_id, timeout_s=10)
        except KVTransferError as e:
            replies.put(("error", str(e)))
            continue
        replies.put(("ok", payload.kv.device.type, dataclasses.replace(payload, kv=payload.kv.cpu())))
    transport.close()
    replies.put("closed")


class Receiver:
    """The test's handle on a receiving process."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=receiver_main, args=(self.commands, self.replies), daemon=True)
        self.process.start()
        assert self.replies.get(timeout=60) == "ready"

    def fetch(self, endpoint: str, transfer_id: str):
        """The payload, its kv on the CPU again, and the device type the receiver got it on."""
        self.commands.put(("fetch", endpoint, transfer_id))
        reply = self.replies.get(timeout=30)
        if reply[0] == "error":
            raise KVTransferError(reply[1])
        return reply[2], reply[1]

    def stop(self) -> None:
        self.commands.put(None)
        assert self.replies.get(timeout=10) == "closed"
        self.process.join(timeout=10)


@pytest.fixture(scope="module")
def sender():
    """A cuda_ipc sender in its own process (its default 4 GiB arena); payloads are made there on the CPU."""
    handle = Sender("cuda_ipc")
    yield handle
    if handle.process.is_alive():
        handle.stop()


@pytest.fixture(scope="module")
def receiver_process():
    handle = Receiver()
    yield handle
    if handle.process.is_alive():
        handle.stop()


@pytest.fixture
def receiver():
    transport = make_kv_transport("cuda_ipc")
    yield transport
    transport.close()


def arena_offset(endpoint: str, transfer_id: str) -> int:
    """Where the sender staged `transfer_id` in its arena: the header's offset, read without acknowledging (the
    sender puts the payload back once it sees the connection close)."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        send_frame(sock, {"op": "fetch", "transfer_id": transfer_id})
        header = recv_frame(sock)
    assert header["ok"] and header["kv_nbytes"] > 0, header
    return header["cuda_ipc"]["offset"]


def fetch_when_back(receiver, endpoint: str, transfer_id: str):
    """Fetch a payload that arena_offset just peeked at, once the sender has put it back."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return receiver.fetch(endpoint, transfer_id, timeout_s=10)
        except KVTransferError as e:
            assert "already being fetched" in str(e) and time.monotonic() < deadline
            time.sleep(0.05)


# --- between two processes on one GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_payload_lands_on_the_receivers_gpu_bit_exact_and_only_once(sender, receiver, dtype):
    transfer_id = f"ipc-{dtype}"
    want = sender.offer(transfer_id, dtype, num_blocks=64)
    got = receiver.fetch(sender.endpoint, transfer_id, timeout_s=10)
    assert got.kv.device == torch.device("cuda", torch.cuda.current_device())
    assert_same_payload(got, want, device="cuda")
    assert sender.fetched.get(timeout=5) == transfer_id
    assert receiver.stats["bytes_received"] == want.num_bytes
    with pytest.raises(KVTransferError, match=f"'{transfer_id}' was fetched"):
        receiver.fetch(sender.endpoint, transfer_id, timeout_s=10)
    time.sleep(0.1)
    assert sender.fetched.empty(), "on_fetched fired more than once"


@pytest.mark.gpu
def test_a_withdrawn_payload_cannot_be_fetched(sender, receiver):
    sender.offer("ipc-withdrawn")
    assert sender.call("withdraw", "ipc-withdrawn") is True
    with pytest.raises(KVTransferError, match="'ipc-withdrawn' was withdrawn"):
        receiver.fetch(sender.endpoint, "ipc-withdrawn", timeout_s=10)
    assert sender.fetched.empty()


@pytest.mark.gpu
def test_an_arena_range_is_reused_once_acknowledged(sender, receiver):
    first = sender.offer("ipc-first", "bfloat16")
    offset = arena_offset(sender.endpoint, "ipc-first")
    second = sender.offer("ipc-second", "bfloat16")
    assert arena_offset(sender.endpoint, "ipc-second") != offset, "two staged payloads share a range"
    assert_same_payload(fetch_when_back(receiver, sender.endpoint, "ipc-first"), first, device="cuda")
    assert sender.fetched.get(timeout=5) == "ipc-first"
    third = sender.offer("ipc-third", "bfloat16")
    assert arena_offset(sender.endpoint, "ipc-third") == offset, "the acknowledged range was not reused"
    # The reused range holds the new payload, and the range next to it still holds its own.
    assert_same_payload(fetch_when_back(receiver, sender.endpoint, "ipc-third"), third, device="cuda")
    assert_same_payload(fetch_when_back(receiver, sender.endpoint, "ipc-second"), second, device="cuda")
    assert sorted(sender.fetched.get(timeout=5) for _ in range(2)) == ["ipc-second", "ipc-third"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cuda_payload_goes_gpu_to_gpu_and_what_the_arena_cannot_hold_goes_inline(receiver_process, dtype):
    """The sender in this process offers CUDA payloads from a 1 MiB arena; the receiving process gets the small one
    through the arena and the big one inline over tcp, both on its GPU."""
    sender = CudaIpcKVTransport(arena_bytes=1 << 20)
    fetched = queue.Queue()
    sender.on_fetched = fetched.put
    try:
        endpoint = sender.start()
        small = make_payload(f"small-{dtype}", dtype, num_blocks=8)  # 32 KiB in float32
        big = make_payload(f"big-{dtype}", dtype, num_blocks=2048)  # 2 or 4 MiB
        assert small.num_bytes < sender.arena_bytes < big.num_bytes
        for want in (small, big):
            sender.offer(want.request_id, dataclasses.replace(want, kv=want.kv.cuda()))
        assert "cuda_ipc" in sender._staged[small.request_id].header
        assert "cuda_ipc" not in sender._staged[big.request_id].header  # inline
        for want in (big, small):
            got, device_type = receiver_process.fetch(endpoint, want.request_id)
            assert device_type == "cuda"
            assert_same_payload(got, want)  # copied back to the CPU in the receiving process
        assert sorted(fetched.get(timeout=5) for _ in range(2)) == sorted([small.request_id, big.request_id])
        assert sender.stats["transfers_sent"] == 2 and sender.stats["bytes_sent"] == small.num_bytes + big.num_bytes
        with pytest.raises(KVTransferError, match="was fetched"):
            receiver_process.fetch(endpoint, small.request_id)
    finally:
        sender.close()


@pytest.mark.gpu
def test_a_receiver_in_the_senders_own_process_reads_the_arena_directly():
    """CUDA cannot open an IPC handle in the process that exported it: a fetch there reads the arena itself."""
    sender, receiver = CudaIpcKVTransport(arena_bytes=64 << 20), make_kv_transport("cuda_ipc")
    try:
        endpoint = sender.start()
        want = make_payload("own", "bfloat16", num_blocks=16)
        sender.offer("own", dataclasses.replace(want, kv=want.kv.cuda()))
        assert_same_payload(receiver.fetch(endpoint, "own", timeout_s=10), want, device="cuda")
    finally:
        receiver.close()
        sender.close()


@pytest.mark.gpu
def test_raw_bandwidth_is_a_device_copy():
    # Far above any host path: a device-to-device copy on a datacenter GPU runs at hundreds of GB/s or more.
    assert CudaIpcKVTransport.measure_raw_bandwidth(64 << 20, repeats=3) > 50e9
