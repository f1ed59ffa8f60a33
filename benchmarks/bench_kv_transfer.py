"""KV transfer benchmark: a full KVPayload fetch between two processes on this host, per transport and size,
against the transport's raw data path (`measure_raw_bandwidth`).

A sender process starts the transport and, per transfer, builds a fresh bfloat16 payload shaped like a llama-3-8B
TP=1 shard (32 layers, 8 kv heads, head_dim 128, block 16: 2 MiB per block; 256 MiB is a 2048-token prompt) and
offers it; this process fetches it. For cuda_ipc the payload is made on the GPU, as a GPU prefill engine's is, and
the fetch returns it on this process's GPU.

    offer      time of `offer` in the sender (tcp: nothing to copy; shm: the copy into the shared segment;
               cuda_ipc: the device-to-device copy into the sender's arena)
    fetch      time of `fetch` in the receiver, from the request to the returned payload
    end-to-end offer + fetch: from a prefill's finished tensor to the decode side holding it

Times are medians over --repeats transfers (after one warm-up transfer per size); raw is the best of as many. Raw
covers the same copies as end-to-end (tcp: the socket path; shm: into shared memory and out; nixl: one NIXL READ
between two processes' registered, warm buffers), so compare the two. nixl runs only where nixl-cu13 is installed.
cuda_ipc's raw is one device-to-device copy between two warm buffers, the copy its fetch makes out of the sender's
arena, so compare its fetch with raw (fetch / raw); it runs only where torch sees a GPU, and its rates are also given
in TB/s (10^12 bytes/s).

    python benchmarks/bench_kv_transfer.py                 # every installed transport, 4/16/64/256 MiB
    python benchmarks/bench_kv_transfer.py --markdown      # also print a markdown table
    python benchmarks/bench_kv_transfer.py --tls           # with mutual TLS (internal_tls), certificates from trustme
    python benchmarks/bench_kv_transfer.py --transports cuda_ipc --sizes-mib 256   # GPU to GPU, llama-3-8B 2k prompt
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

# Run as a script from anywhere: make the repository's packages importable without installing them.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from workers.kv.handoff import KVPayload  # noqa: E402
from workers.kv_transfer import KV_TRANSPORTS, make_kv_transport  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
BLOCK_BYTES = NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 2  # bfloat16
FILL = 1.5  # exactly representable in bfloat16: the receiver checks it


def make_payload(request_id: str, kv_bytes: int, device: str = "cpu") -> KVPayload:
    num_blocks = max(1, kv_bytes // BLOCK_BYTES)
    kv = torch.full((NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), FILL, dtype=torch.bfloat16,
                    device=device)
    num_tokens = num_blocks * BLOCK_SIZE
    return KVPayload(request_id=request_id, model="bench", block_size=BLOCK_SIZE, dtype="bfloat16", tp_rank=0,
                     tp_size=1, num_kv_heads_total=NUM_KV_HEADS, prompt_token_ids=list(range(num_tokens - 1)),
                     output_token_ids=[7],
                     num_computed_tokens=num_tokens, num_cached_tokens=0, kv=kv)


def sender_main(transport_name: str, commands: mp.Queue, replies: mp.Queue, tls=None) -> None:
    """The prefill side: offer a fresh payload per command (transfer_id, kv_bytes); reply with the offer time."""
    transport = make_kv_transport(transport_name, tls=tls)
    replies.put(transport.start())
    for transfer_id, kv_bytes in iter(commands.get, None):
        payload = make_payload(transfer_id, kv_bytes, payload_device(transport_name))
        if payload.kv.is_cuda:
            torch.cuda.synchronize()  # the fill is done before the offer is timed
        t0 = time.perf_counter()
        transport.offer(transfer_id, payload)
        offer_s = time.perf_counter() - t0
        del payload  # freed before the fetch starts, so that the free does not slow the sender's reply
        replies.put(offer_s)
    transport.close()


def payload_device(transport_name: str) -> str:
    """Where the sender makes its payloads: on the GPU for cuda_ipc, in host memory for the others."""
    return "cuda" if transport_name == "cuda_ipc" else "cpu"


def bench_transport(name: str, sizes_mib: list[int], repeats: int, tls=None) -> list[dict]:
    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    sender = ctx.Process(target=sender_main, args=(name, commands, replies, tls), daemon=True)
    sender.start()
    receiver = make_kv_transport(name, tls=tls)
    label = f"{name}+tls" if tls is not None else name
    rows = []
    try:
        endpoint = replies.get(timeout=60)
        for size_mib in sizes_mib:
            offer_s, fetch_s = [], []
            for i in range(repeats + 1):  # the first transfer warms up the connection and the allocator
                transfer_id = f"{name}-{size_mib}-{i}"
                commands.put((transfer_id, size_mib * MIB))
                offer_s.append(replies.get(timeout=60))
                t0 = time.perf_counter()
                payload = receiver.fetch(endpoint, transfer_id, timeout_s=60.0)
                fetch_s.append(time.perf_counter() - t0)
                if payload.kv.view(-1)[-1].item() != FILL or payload.request_id != transfer_id:
                    raise RuntimeError(f"{name}: transfer {transfer_id} arrived corrupted")
                num_bytes = payload.num_bytes
                del payload
            offer, fetch = statistics.median(offer_s[1:]), statistics.median(fetch_s[1:])
            raw = type(receiver).measure_raw_bandwidth(num_bytes, repeats=repeats)
            rows.append(dict(transport=label, size_mib=num_bytes / MIB, offer_ms=offer * 1e3, fetch_ms=fetch * 1e3,
                             fetch_gib_s=num_bytes / fetch / GIB, end_to_end_gib_s=num_bytes / (offer + fetch) / GIB,
                             raw_gib_s=raw / GIB, end_to_end_vs_raw=num_bytes / (offer + fetch) / raw,
                             fetch_tb_s=num_bytes / fetch / 1e12, raw_tb_s=raw / 1e12,
                             fetch_vs_raw=num_bytes / fetch / raw,
                             kv_device=payload_device(name)))
            print(_format_row(rows[-1]), flush=True)
    finally:
        commands.put(None)
        sender.join(timeout=30)
        if sender.is_alive():
            sender.kill()
        receiver.close()
    return rows


COLUMNS = ("transport", "size MiB", "offer ms", "fetch ms", "fetch GiB/s", "end-to-end GiB/s", "raw GiB/s",
           "end-to-end / raw", "fetch TB/s", "raw TB/s", "fetch / raw")


def _cells(row: dict) -> list[str]:
    return [row["transport"], f"{row['size_mib']:.0f}", f"{row['offer_ms']:.2f}", f"{row['fetch_ms']:.2f}",
            f"{row['fetch_gib_s']:.2f}", f"{row['end_to_end_gib_s']:.2f}", f"{row['raw_gib_s']:.2f}",
            f"{row['end_to_end_vs_raw']:.0%}", f"{row['fetch_tb_s']:.3f}", f"{row['raw_tb_s']:.3f}",
            f"{row['fetch_vs_raw']:.0%}"]


def _format_row(row: dict) -> str:
    return "  ".join(f"{k}={v}" for k, v in zip(COLUMNS, _cells(row)))


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def available_transports() -> list[str]:
    """KV_TRANSPORTS less those that cannot run here (nixl without nixl-cu13, cuda_ipc without a GPU)."""
    names = []
    for name in KV_TRANSPORTS:
        try:
            make_kv_transport(name).close()
        except ValueError:
            continue
        names.append(name)
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", nargs="+", default=available_transports(), choices=KV_TRANSPORTS)
    p.add_argument("--sizes-mib", nargs="+", type=int, default=[4, 16, 64, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path, default=None, help="also write the rows and the machine to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    p.add_argument("--tls", action="store_true", help="mutual TLS on the transports' tcp connections (raw stays plain)")
    return p.parse_args(argv)


def throwaway_tls(folder: Path):
    """A cluster CA and one certificate for 127.0.0.1 (trustme, from the test extra), as TLSConfig.internal."""
    import trustme

    from tandem.tls import TLSConfig

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    return TLSConfig.internal(str(folder / "cert.pem"), str(folder / "key.pem"), str(folder / "ca.pem"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        tls = throwaway_tls(Path(folder)) if args.tls else None
        rows = [row for name in args.transports for row in bench_transport(name, args.sizes_mib, args.repeats, tls)]
    if args.markdown:
        print(format_markdown(rows))
    if args.output is not None:
        record = dict(command=sys.argv, date=datetime.now().isoformat(timespec="seconds"),
                      machine=platform.platform(), processor=platform.processor(), torch=torch.__version__, rows=rows)
        args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
