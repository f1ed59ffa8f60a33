"""From request records to the numbers people compare, named as `vllm bench serve` names them.

Latency statistics come from successful requests only (as in vLLM); failures are counted by status. Goodput is
the rate of requests that succeeded and met every SLO, over the whole run's duration.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from loadtest.client import RequestRecord
from loadtest.scenario import SLO

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p50", "p90", "p95", "p99")


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per metric, its samples (ms) over the successful requests; ITL pools every request's gaps."""
    ok = [r for r in records if r.ok]
    return {
        "ttft": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "tpot": [r.tpot_ms for r in ok if r.tpot_ms is not None],
        "itl": [g for r in ok for g in r.itl_ms],
        "e2el": [r.e2el_ms for r in ok],
    }


def is_good(record: RequestRecord, slo: SLO) -> bool:
    return record.ok and record.ttft_ms is not None and slo.met_by(record.ttft_ms, record.tpot_ms, record.e2el_ms)


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO) -> dict:
    """The run's summary: counts, throughputs, goodput and latency statistics (None where there is no sample)."""
    ok = [r for r in records if r.ok]
    num_good = sum(is_good(r, slo) for r in records)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration_s = max(duration_s, 1e-9)
    summary = {
        "duration": duration_s,
        "num_prompts": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(sorted(Counter(r.status for r in records if not r.ok).items())),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration_s,
        "request_goodput": num_good / duration_s,
        # The share of all requests sent (failures included) that were good: DistServe's SLO attainment.
        "slo_attainment": num_good / len(records) if records else None,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    for name, samples in latency_samples(records).items():
        summary.update(_stats(name, samples))
    return summary


def _stats(name: str, samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {f"{stat}_{name}_ms": None for stat in STATS}
    a = np.asarray(samples, dtype=float)
    out = {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
           f"std_{name}_ms": float(a.std())}
    for p in (50, 90, 95, 99):
        out[f"p{p}_{name}_ms"] = float(np.percentile(a, p))
    return out


def time_series(records: Sequence[RequestRecord], bin_s: float = 1.0) -> dict[str, np.ndarray]:
    """Per `bin_s` bin of the run (bin i spans edges_s[i] to edges_s[i + 1]): output tokens/s received (any request, failed ones too), requests completed/s,
    and the mean TTFT (ms) of the requests sent in the bin (NaN where none was)."""
    chunk_s, chunk_n = [], []
    for r in records:
        if r.ttft_ms is None:
            continue
        t = r.send_s + r.ttft_ms / 1e3 + np.concatenate(([0.0], np.cumsum(r.itl_ms) / 1e3))
        chunk_s.extend(t[:len(r.chunk_tokens)])
        chunk_n.extend(r.chunk_tokens)
    end_s = max([r.send_s + r.e2el_ms / 1e3 for r in records], default=0.0)
    edges = np.arange(0.0, end_s + bin_s, bin_s)
    if len(edges) < 2:
        edges = np.array([0.0, bin_s])
    tokens, _ = np.histogram(chunk_s, bins=edges, weights=chunk_n)
    done, _ = np.histogram([r.send_s + r.e2el_ms / 1e3 for r in records if r.ok], bins=edges)
    sent = [r for r in records if r.ttft_ms is not None]
    ttft_sum, _ = np.histogram([r.send_s for r in sent], bins=edges, weights=[r.ttft_ms for r in sent])
    ttft_n, _ = np.histogram([r.send_s for r in sent], bins=edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        ttft_mean = np.where(ttft_n > 0, ttft_sum / ttft_n, np.nan)
    return {"edges_s": edges, "output_tok_per_s": tokens / bin_s, "completed_per_s": done / bin_s,
            "mean_ttft_ms": ttft_mean}
