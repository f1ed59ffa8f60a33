"""Recorded metric series: what the autoscaler saw, one JSON line per interval, to replay through the planner
(its tests; tuning its options offline). benchmarks/record_autoscaler_series.py records them from a real cluster."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cluster.autoscaler.planner import PoolLoad, Sample
from cluster.pools import PoolReplicas


def load_series(path: Path) -> list[tuple[float, dict[str, PoolReplicas], Sample | None]]:
    """One (t_s, pools, sample) per recorded interval; sample None for the first (no difference yet)."""
    out = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        pools = {role: PoolReplicas(**fields) for role, fields in row["pools"].items()}
        sample = None
        if row["sample"] is not None:
            sample = Sample(row["t_s"], {role: PoolLoad(**fields) for role, fields in row["sample"].items()})
        out.append((row["t_s"], pools, sample))
    return out


def series_row(t_s: float, pools: dict[str, PoolReplicas], sample: Sample | None) -> str:
    """One line of a series file."""
    return json.dumps({"t_s": round(t_s, 3), "pools": {r: dataclasses.asdict(p) for r, p in pools.items()},
                       "sample": None if sample is None else
                       {r: dataclasses.asdict(load) for r, load in sample.pools.items()}}) + "\n"
