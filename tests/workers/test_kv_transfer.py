"""KV transports: payloads cross between two processes bit for bit, at most once, and every failure is a prompt
KVTransferError that names what failed."""
from __future__ import annotations

import dataclasses
import glob
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from workers.kv.handoff import KVPayload
from workers.kv_transfer import KV_TRANSPORTS, KVTransferError, make_kv_transport
from workers.kv_transfer.shm import ARENA_PREFIX, QUARANTINE_S, SHM_DIR, ShmKVTransport, remove_stale_arenas
from workers.kv_transfer.wire import recv_exact, recv_frame, send_frame

FAST_S = 1.0  # an error that needs no waiting must come within this
try:
    import nixl_cu13._api  # noqa: F401
    NIXL_MISSING = None
except ImportError as e:
    NIXL_MISSING = f"nixl_cu13 is not importable ({e}): pip install 'nixl-cu13==1.5.1' to test the nixl transport"
# Every transport, the nixl one skipped where its library is missing; cuda_ipc is a gpu test (skipped without CUDA).
TRANSPORTS = [pytest.param(name, marks=pytest.mark.gpu) if name == "cuda_ipc" else
              pytest.param(name, marks=pytest.mark.skipif(name == "nixl" and NIXL_MISSING is not None,
                                                          reason=NIXL_MISSING or "")) for name in KV_TRANSPORTS]


def make_payload(request_id: str, dtype: str = "float32", num_blocks: int = 3, block_size: int = 4) -> KVPayload:
    """Deterministic from its arguments, so that the sending process and the test build the same one."""
    gen = torch.Generator().manual_seed(len(request_id) * 1000 + num_blocks)
    kv = torch.randn(2, 2, num_blocks, block_size, 2, 8, generator=gen).to(getattr(torch, dtype))
    num_tokens = num_blocks * block_size - 1
    return KVPayload(request_id=request_id, model="tiny-llama", block_size=block_size, dtype=dtype, tp_rank=1,
                     tp_size=2, num_kv_heads_total=4, prompt_token_ids=list(range(100, 100 + num_tokens)),
                     output_token_ids=[2**40 + 7],
                     num_computed_tokens=num_tokens, num_cached_tokens=block_size, kv=kv)


def landing_device(name: str) -> str:
    """Where a fetch over transport `name` puts the kv: cuda_ipc keeps it on the GPU, the others on the CPU."""
    return "cuda" if name == "cuda_ipc" else "cpu"


def assert_same_payload(got: KVPayload, want: KVPayload, device: str = "cpu") -> None:
    for field in ("request_id", "model", "block_size", "dtype", "tp_rank", "tp_size", "num_kv_heads_total", "layout",
                  "prompt_token_ids", "output_token_ids", "num_computed_tokens", "num_cached_tokens"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.kv.device.type == device
    assert got.kv.dtype == want.kv.dtype and got.kv.shape == want.kv.shape
    int_dtype = {2: torch.int16, 4: torch.int32}[want.kv.element_size()]
    assert torch.equal(got.kv.cpu().view(int_dtype), want.kv.cpu().view(int_dtype)), "kv differs bit for bit"


def arenas_of(pid: int) -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"{ARENA_PREFIX}{pid}-*"))


# --- the sending process --------------------------------------------------------------------------------


def sender_main(name: str, commands: mp.Queue, replies: mp.Queue, fetched: mp.Queue, tls=None) -> None:
    """A prefill worker's side: serve (mutual TLS with `tls`), and run (command, *args) from the test; on_fetched
    goes to `fetched`."""
    transport = make_kv_transport(name, tls=tls)
    transport.on_fetched = fetched.put
    replies.put((os.getpid(), transport.start()))
    for command, *args in iter(commands.get, None):
        if command == "offer":
            replies.put(("offered", transport.offer(args[0], make_payload(*args))))
        elif command == "withdraw":
            replies.put(transport.withdraw(args[0]))
        elif command == "stats":
            replies.put(transport.stats)
    transport.close()
    transport.close()
    replies.put("closed")


class Sender:
    """The test's handle on a sending process."""

    def __init__(self, name: str, tls=None):
        self.name = name
        ctx = mp.get_context("spawn")
        self.commands, self.replies, self.fetched = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=sender_main, args=(name, self.commands, self.replies, self.fetched, tls),
                                   daemon=True)
        self.process.start()
        self.pid, self.endpoint = self.replies.get(timeout=60)
        self.locators: dict[str, str | None] = {}  # what each offer returned

    def call(self, *command):
        self.commands.put(command)
        return self.replies.get(timeout=10)

    def offer(self, transfer_id: str, dtype: str = "float32", num_blocks: int = 3) -> KVPayload:
        reply, self.locators[transfer_id] = self.call("offer", transfer_id, dtype, num_blocks)
        assert reply == "offered"
        return make_payload(transfer_id, dtype, num_blocks)

    def stop(self) -> None:
        self.commands.put(None)
        assert self.replies.get(timeout=10) == "closed"
        self.process.join(timeout=10)


@pytest.fixture(scope="module", params=TRANSPORTS)
def sender(request):
    handle = Sender(request.param)
    yield handle
    if handle.process.is_alive():
        handle.stop()


@pytest.fixture
def receiver(sender):
    transport = make_kv_transport(sender.name)
    yield transport
    transport.close()


# --- between two processes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact_and_acknowledged_once(sender, receiver, dtype):
    transfer_id = f"rt-{dtype}"
    want = sender.offer(transfer_id, dtype)
    got = receiver.fetch(sender.endpoint, transfer_id, timeout_s=10)
    assert_same_payload(got, want, landing_device(sender.name))
    assert sender.fetched.get(timeout=5) == transfer_id
    assert receiver.stats["transfers_received"] == 1 and receiver.stats["bytes_received"] == want.num_bytes
    sent = sender.call("stats")
    assert sent["bytes_sent"] >= want.num_bytes
    with pytest.raises(KVTransferError, match=f"'{transfer_id}' was fetched"):
        receiver.fetch(sender.endpoint, transfer_id, timeout_s=10)
    time.sleep(0.1)
    assert sender.fetched.empty(), "on_fetched fired more than once"


def test_only_shm_offers_a_locator_for_one_sided_reads(sender):
    sender.offer("where")
    assert (sender.locators["where"] is not None) == (sender.name == "shm")
    assert sender.call("withdraw", "where") is True


@pytest.mark.parametrize("sender", ["shm"], indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_sided_read_is_bit_exact_and_committed_in_the_background(sender, receiver, dtype):
    transfer_id = f"direct-{dtype}"
    want = sender.offer(transfer_id, dtype, num_blocks=300)
    locator = sender.locators[transfer_id]
    assert_same_payload(receiver.fetch(sender.endpoint, transfer_id, timeout_s=10, locator=locator), want)
    assert sender.fetched.get(timeout=5) == transfer_id  # the commit frees it on the sender without waiting a lease
    assert sender.call("stats")["bytes_sent"] >= want.num_bytes
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="no longer staged"):
        receiver.fetch(sender.endpoint, transfer_id, timeout_s=10, locator=locator)
    with pytest.raises(KVTransferError, match=f"'{transfer_id}' was fetched"):
        receiver.fetch(sender.endpoint, transfer_id, timeout_s=10)
    assert time.monotonic() - t0 < FAST_S
    time.sleep(0.1)
    assert sender.fetched.empty(), "on_fetched fired more than once"


@pytest.mark.parametrize("sender", ["shm"], indirect=True)
def test_one_sided_read_of_a_withdrawn_payload_fails_fast(sender, receiver):
    sender.offer("withdrawn-direct")
    assert sender.call("withdraw", "withdrawn-direct") is True
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="'withdrawn-direct'.*no longer staged"):
        receiver.fetch(sender.endpoint, "withdrawn-direct", timeout_s=10, locator=sender.locators["withdrawn-direct"])
    assert time.monotonic() - t0 < FAST_S
    time.sleep(0.1)
    assert sender.fetched.empty()


@pytest.mark.parametrize("sender", ["shm"], indirect=True)
def test_bad_locators_are_refused_by_name(sender, receiver):
    sender.offer("target")
    path, offset, generation = sender.locators["target"].split("|")
    for locator, problem in [("garbage", "is not path|offset|generation"),
                             (f"/etc/passwd|0|{generation}", "is not a KV arena"),
                             (f"{path}|{1 << 40}|{generation}", "lies outside the arena"),
                             (f"{path}|{offset}|{int(generation) + 1}", "no longer staged")]:
        with pytest.raises(KVTransferError, match=problem):
            receiver.fetch(sender.endpoint, "target", timeout_s=10, locator=locator)
    with pytest.raises(KVTransferError, match="the tcp transport reads no locator"):
        make_kv_transport("tcp").fetch(sender.endpoint, "target", timeout_s=10, locator=sender.locators["target"])
    assert_same_payload(receiver.fetch(sender.endpoint, "target", timeout_s=10), make_payload("target"))
    assert sender.fetched.get(timeout=5) == "target"


def test_shm_reuses_committed_ranges_at_once_and_withdrawn_ones_after_their_quarantine():
    sender, receiver = ShmKVTransport(arena_bytes=64 << 20), make_kv_transport("shm")

    def offset(locator: str) -> str:
        return locator.split("|")[1]

    try:
        endpoint = sender.start()
        first = sender.offer("first", make_payload("first"))
        receiver.fetch(endpoint, "first", timeout_s=10, locator=first)
        deadline = time.monotonic() + 5
        while sender.stats["transfers_sent"] < 1:  # the commit arrives in the background
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = sender.offer("second", make_payload("second"))
        assert offset(second) == offset(first), "a committed range was not reused"
        third = sender.offer("third", make_payload("third"))
        assert sender.withdraw("third")
        fourth = sender.offer("fourth", make_payload("fourth"))
        assert offset(fourth) != offset(third), "a withdrawn range was reused within its quarantine"
        time.sleep(QUARANTINE_S + 0.1)
        fifth = sender.offer("fifth", make_payload("fifth"))
        assert offset(fifth) == offset(third), "a range past its quarantine was not reused"
        with pytest.raises(KVTransferError, match="no longer staged"):
            receiver.fetch(endpoint, "first", timeout_s=10, locator=first)  # its range holds "second" now
        for name, locator in (("second", second), ("fourth", fourth), ("fifth", fifth)):
            assert_same_payload(receiver.fetch(endpoint, name, timeout_s=10, locator=locator), make_payload(name))
    finally:
        receiver.close()
        sender.close()


def test_unknown_and_withdrawn_ids_fail_fast(sender, receiver):
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match=f"'nope' from {sender.endpoint}: unknown transfer 'nope'"):
        receiver.fetch(sender.endpoint, "nope", timeout_s=10)
    sender.offer("gone")
    assert sender.call("withdraw", "gone") is True
    assert sender.call("withdraw", "gone") is False
    with pytest.raises(KVTransferError, match="'gone' was withdrawn"):
        receiver.fetch(sender.endpoint, "gone", timeout_s=10)
    assert time.monotonic() - t0 < 2 * FAST_S
    assert sender.fetched.empty()


def test_concurrent_fetches_from_threads(sender, receiver):
    ids = [f"conc-{i}" for i in range(6)]
    wants = {i: sender.offer(i, "bfloat16", num_blocks=2 + n) for n, i in enumerate(ids)}
    with ThreadPoolExecutor(len(ids)) as pool:
        gots = dict(zip(ids, pool.map(lambda i: receiver.fetch(sender.endpoint, i, timeout_s=10), ids)))
    for i in ids:
        assert_same_payload(gots[i], wants[i], landing_device(sender.name))
    assert sorted(sender.fetched.get(timeout=5) for _ in ids) == sorted(ids)


def test_a_receiver_dying_mid_transfer_leaves_the_payload_staged(sender, receiver):
    want = sender.offer("orphan", num_blocks=4096)  # 4 MiB: more than the socket buffers hold
    host, port = sender.endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        send_frame(sock, {"op": "fetch", "transfer_id": "orphan"})
        assert recv_frame(sock)["ok"]
        recv_exact(sock, 1000)
    # The sender notices the closed connection and puts the payload back; a fetch may race it and be refused once.
    deadline = time.monotonic() + 5
    while True:
        try:
            got = receiver.fetch(sender.endpoint, "orphan", timeout_s=10)
            break
        except KVTransferError as e:
            assert "already being fetched" in str(e) and time.monotonic() < deadline
            time.sleep(0.05)
    assert_same_payload(got, want, landing_device(sender.name))
    assert sender.fetched.get(timeout=5) == "orphan"


def test_withdraw_during_a_transfer_is_not_committed(sender):
    sender.offer("late")
    host, port = sender.endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        send_frame(sock, {"op": "fetch", "transfer_id": "late"})
        header = recv_frame(sock)
        recv_exact(sock, (header["num_prompt_tokens"] + header["num_output_tokens"]) * 8)
        if not {"shm", "nixl", "cuda_ipc"} & set(header):  # those leave the kv bytes where they are
            recv_exact(sock, header["kv_nbytes"])
        assert sender.call("withdraw", "late") is True
        send_frame(sock, {"op": "ack", "transfer_id": "late"})
        confirm = recv_frame(sock)
    assert not confirm["ok"] and "withdrawn during the transfer" in confirm["error"]
    time.sleep(0.1)
    assert sender.fetched.empty()


def test_closing_the_sender_releases_its_port_and_memory(sender, receiver):
    name = receiver.name
    other = Sender(name)
    other.offer("left-behind")
    if name == "shm":
        assert arenas_of(other.pid)
    other.stop()  # closes twice
    assert other.process.exitcode == 0
    assert arenas_of(other.pid) == []
    with pytest.raises(KVTransferError, match=f"{other.endpoint}.*refused"):
        receiver.fetch(other.endpoint, "left-behind", timeout_s=5)


# --- in one process -------------------------------------------------------------------------------------


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted = []
        threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
        yield f"127.0.0.1:{listener.getsockname()[1]}"
        for conn, _ in accepted:
            conn.close()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_fetch_from_a_silent_server_times_out(name, silent_server):
    transport = make_kv_transport(name)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match=f"'x' from {silent_server}: timed out after 0.3 s"):
        transport.fetch(silent_server, "x", timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 0.3 + FAST_S
    transport.close()


@pytest.mark.parametrize("name", TRANSPORTS)
def test_close_is_idempotent_and_stops_serving(name):
    transport = make_kv_transport(name)
    endpoint = transport.start()
    transport.offer("a", make_payload("a"))
    transport.close()
    transport.close()
    assert transport.endpoint is None
    assert arenas_of(os.getpid()) == []
    with pytest.raises(KVTransferError, match="refused"):
        make_kv_transport(name).fetch(endpoint, "a", timeout_s=5)
    with pytest.raises(KVTransferError, match="closed"):
        transport.offer("b", make_payload("b"))
    with pytest.raises(KVTransferError, match="closed"):
        transport.start()


def test_offer_checks_its_arguments():
    transport = make_kv_transport("tcp")
    with pytest.raises(KVTransferError, match="start"):
        transport.offer("a", make_payload("a"))
    transport.start()
    transport.offer("a", make_payload("a"))
    with pytest.raises(ValueError, match="transfer_id: 'a' is already staged"):
        transport.offer("a", make_payload("a"))
    transport.close()


def test_make_kv_transport_rejects_unknown_names():
    with pytest.raises(ValueError, match="kv_transport: must be one of tcp, shm, nixl, cuda_ipc, got 'nope'"):
        make_kv_transport("nope")


def test_shm_without_the_senders_segment_fails_clearly_and_keeps_the_payload():
    sender, receiver = make_kv_transport("shm"), make_kv_transport("shm")
    endpoint = sender.start()
    sender.offer("a", make_payload("a"))
    (arena,) = arenas_of(os.getpid())
    os.rename(arena, arena + "-elsewhere")  # as if the receiver saw another host's /dev/shm
    with pytest.raises(KVTransferError, match=f"'a' from {endpoint}: .*not found.*tcp"):
        receiver.fetch(endpoint, "a", timeout_s=5)
    os.rename(arena + "-elsewhere", arena)
    deadline = time.monotonic() + 5
    while True:  # the sender reverts the transfer when it sees the failed receiver's connection close
        try:
            assert_same_payload(receiver.fetch(endpoint, "a", timeout_s=5), make_payload("a"))
            break
        except KVTransferError as e:
            assert "already being fetched" in str(e) and time.monotonic() < deadline
    sender.close()
    receiver.close()
    assert arenas_of(os.getpid()) == []


def test_shm_sends_inline_what_the_arena_cannot_hold():
    sender, receiver = ShmKVTransport(arena_bytes=1 << 20), make_kv_transport("shm")
    endpoint = sender.start()
    big, small = make_payload("big", num_blocks=2048), make_payload("small")  # 2 MiB, 3 KiB
    sender.offer("big", big)
    sender.offer("small", small)
    assert_same_payload(receiver.fetch(endpoint, "small", timeout_s=5), small)
    assert_same_payload(receiver.fetch(endpoint, "big", timeout_s=5), big)
    sender.offer("again", small)
    with pytest.raises(KVTransferError, match="shm transport: fetch with make_kv_transport\\('shm'\\)"):
        make_kv_transport("tcp").fetch(endpoint, "again", timeout_s=5)
    sender.close()
    receiver.close()


def test_stale_arenas_of_dead_senders_are_removed():
    live = make_kv_transport("shm")
    live.start()
    stale = os.path.join(SHM_DIR, f"{ARENA_PREFIX}999999999-dead")
    with open(stale, "wb") as f:
        f.write(b"\0" * 4096)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert stale in remove_stale_arenas() and not os.path.exists(stale)
    assert len(arenas_of(os.getpid())) == 1, "a live sender's arena is locked, and stays"
    live.close()


def test_nixl_without_its_library_is_refused_with_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl_cu13", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ValueError, match="kv_transport: 'nixl' needs the NIXL library.*pip install 'nixl-cu13"):
        make_kv_transport("nixl")


@pytest.mark.skipif(NIXL_MISSING is not None, reason=NIXL_MISSING or "")
def test_nixl_and_tcp_peers():
    """A nixl receiver takes inline payloads from a tcp sender; a tcp receiver is told to use nixl, and the
    payload stays staged for a nixl receiver."""
    tcp_sender, nixl_sender, receiver = make_kv_transport("tcp"), make_kv_transport("nixl"), make_kv_transport("nixl")
    tcp_endpoint, nixl_endpoint = tcp_sender.start(), nixl_sender.start()
    want = make_payload("a", "bfloat16")
    tcp_sender.offer("a", want)
    assert_same_payload(receiver.fetch(tcp_endpoint, "a", timeout_s=5), want)
    nixl_sender.offer("a", want)
    with pytest.raises(KVTransferError, match=r"uses the nixl transport: fetch with make_kv_transport\(.nixl.\)"):
        make_kv_transport("tcp").fetch(nixl_endpoint, "a", timeout_s=5)
    deadline = time.monotonic() + 5
    while True:  # the sender reverts the transfer when it sees the refused receiver's connection close
        try:
            assert_same_payload(receiver.fetch(nixl_endpoint, "a", timeout_s=5), want)
            break
        except KVTransferError as e:
            assert "already being fetched" in str(e) and time.monotonic() < deadline
    for transport in (tcp_sender, nixl_sender, receiver):
        transport.close()


@pytest.mark.gpu
@pytest.mark.parametrize("name", [p for p in TRANSPORTS if p.values[0] != "cuda_ipc"])  # it stays on the GPU
def test_a_cuda_payload_arrives_on_the_cpu(name):
    sender, receiver = make_kv_transport(name), make_kv_transport(name)
    endpoint = sender.start()
    want = make_payload("gpu", "bfloat16")
    sender.offer("gpu", dataclasses.replace(want, kv=want.kv.cuda()))
    assert_same_payload(receiver.fetch(endpoint, "gpu", timeout_s=10), want)
    sender.close()
    receiver.close()
