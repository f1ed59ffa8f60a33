"""PNG plots of a run or a sweep, drawn with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loadtest.client import RequestRecord  # noqa: E402
from loadtest.metrics import latency_samples, time_series  # noqa: E402
from loadtest.scenario import SLO  # noqa: E402


def plot_run(records: Sequence[RequestRecord], slo: SLO, out_dir: Path) -> list[Path]:
    """latency_cdf.png (TTFT, TPOT, ITL, E2E) and timeline.png (throughput and TTFT over time, 1 s bins)."""
    return [_latency_cdfs(records, slo, out_dir / "latency_cdf.png"), _timeline(records, out_dir / "timeline.png")]


def _latency_cdfs(records: Sequence[RequestRecord], slo: SLO, path: Path) -> Path:
    samples = latency_samples(records)
    bounds = {"ttft": slo.ttft_ms, "tpot": slo.tpot_ms, "e2el": slo.e2el_ms}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, name in zip(axes.flat, ("ttft", "tpot", "itl", "e2el")):
        values = np.sort(samples[name])
        if len(values):
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post")
        if bounds.get(name) is not None:
            ax.axvline(bounds[name], color="tab:red", linestyle="--", label=f"SLO {bounds[name]:g} ms")
            ax.legend(loc="lower right")
        ax.set_title(f"{name.upper()} ({len(values)} samples)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _timeline(records: Sequence[RequestRecord], path: Path) -> Path:
    ts = time_series(records)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.stairs(ts["output_tok_per_s"], ts["edges_s"], label="output tok/s")
    top.set_ylabel("output tokens/s")
    twin = top.twinx()
    twin.stairs(ts["completed_per_s"], ts["edges_s"], color="tab:green", label="completed req/s")
    twin.set_ylabel("requests completed/s")
    top.legend(loc="upper left")
    twin.legend(loc="upper right")
    top.grid(alpha=0.3)
    sent = [r for r in records if r.ttft_ms is not None]
    bottom.scatter([r.send_s for r in sent], [r.ttft_ms for r in sent], s=6, alpha=0.4, label="request")
    bottom.stairs(ts["mean_ttft_ms"], ts["edges_s"], color="tab:orange", label="mean per 1 s")
    failed = [r for r in records if not r.ok]
    if failed:
        bottom.scatter([r.send_s for r in failed], [0] * len(failed), marker="x", color="tab:red", label="failed")
    bottom.set_xlabel("time since start (s); TTFT at the request's send time")
    bottom.set_ylabel("TTFT (ms)")
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_goodput_vs_rate(steps: Sequence[dict], path: Path) -> Path:
    """A sweep's goodput and throughput against the offered rate, the maximum goodput marked."""
    rates = [s["rate"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(rates, [s["request_throughput"] for s in steps], "o-", label="request throughput")
    goodput = [s["request_goodput"] for s in steps]
    ax.plot(rates, goodput, "o-", label="request goodput")
    best = int(np.argmax(goodput))
    ax.annotate(f"max goodput {goodput[best]:.2f} req/s\nat {rates[best]:g} req/s", (rates[best], goodput[best]),
                textcoords="offset points", xytext=(10, -30))
    ax.plot(rates, rates, ":", color="grey", label="offered rate")
    ax.set_xscale("log")
    ax.set_xticks(rates, labels=[f"{r:.3g}" for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("req/s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
