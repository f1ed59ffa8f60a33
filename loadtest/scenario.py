"""A load-test scenario: who arrives when, with what prompt and output lengths, judged against which SLOs.

Scenarios are YAML files (`loadtest/scenarios/*.yaml`, or any path). Each section is a frozen dataclass validated
in `__post_init__`; `load_scenario` prefixes every error with the YAML path of the offending field, e.g.
`arrival.burstiness: must be > 0, got -1`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SCENARIOS_DIR = Path(__file__).parent / "scenarios"
ARRIVAL_PROCESSES = ("poisson", "gamma", "constant", "ramp", "concurrency")
LENGTH_DISTS = ("fixed", "uniform", "normal", "choice")


@dataclass(frozen=True)
class Arrival:
    """When requests are sent. Open loop (poisson, gamma, constant, ramp) follows a clock whatever the latency;
    closed loop (concurrency) keeps `concurrency` requests in flight."""

    process: str = "poisson"
    rate: float | None = None  # req/s: poisson, gamma, constant
    # Gamma shape, as vLLM's --burstiness: 1 is Poisson, < 1 burstier, > 1 more regular.
    burstiness: float = 1.0
    start_rate: float | None = None  # ramp: req/s at the start, rising (or falling) linearly to end_rate
    end_rate: float | None = None
    concurrency: int | None = None  # closed loop: requests in flight

    def __post_init__(self):
        _check_numbers(self, ("rate", "burstiness", "start_rate", "end_rate"))
        if self.process not in ARRIVAL_PROCESSES:
            raise ValueError(f"process: must be one of {', '.join(ARRIVAL_PROCESSES)}, got {self.process!r}")
        needs = {"poisson": ("rate",), "gamma": ("rate",), "constant": ("rate",),
                 "ramp": ("start_rate", "end_rate"), "concurrency": ("concurrency",)}[self.process]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required for process {self.process!r}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate: must be > 0 req/s, got {self.rate!r}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness: must be > 0 (1 = Poisson, < 1 burstier), got {self.burstiness!r}")
        if self.process == "ramp":
            if self.start_rate < 0 or self.end_rate < 0 or not (self.start_rate + self.end_rate) > 0:
                raise ValueError(f"start_rate, end_rate: must be >= 0 req/s and not both 0, "
                                 f"got {self.start_rate!r}, {self.end_rate!r}")
        _check_ints(self, ("concurrency",))
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {self.concurrency!r}")

    @property
    def is_open_loop(self) -> bool:
        return self.process != "concurrency"

    @property
    def mean_rate(self) -> float | None:
        """Average req/s of an open-loop process; None for closed loop."""
        if self.process == "ramp":
            return (self.start_rate + self.end_rate) / 2
        return self.rate


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: fixed `value`; uniform [min, max]; normal(mean, std) clipped to [min, max];
    or `choice` among `values` with `weights`. In YAML a bare integer means fixed."""

    dist: str = "fixed"
    value: int | None = None
    min: int | None = None
    max: int | None = None
    mean: float | None = None
    std: float | None = None
    values: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self):
        _check_numbers(self, ("mean", "std"))
        if self.dist not in LENGTH_DISTS:
            raise ValueError(f"dist: must be one of {', '.join(LENGTH_DISTS)}, got {self.dist!r}")
        needs = {"fixed": ("value",), "uniform": ("min", "max"), "normal": ("mean", "std", "min", "max"),
                 "choice": ("values",)}[self.dist]
        for name in needs:
            if getattr(self, name) in (None, ()):
                raise ValueError(f"{name}: required for dist {self.dist!r}")
        for name in ("value", "min", "max"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: must be a whole number of tokens >= 1, got {v!r}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min: must be <= max ({self.max}), got {self.min}")
        if self.std is not None and self.std < 0:
            raise ValueError(f"std: must be >= 0, got {self.std!r}")
        if any(not isinstance(v, int) or v < 1 for v in self.values):
            raise ValueError(f"values: must be whole numbers of tokens >= 1, got {list(self.values)}")
        if self.weights and (len(self.weights) != len(self.values) or any(w < 0 for w in self.weights)
                             or sum(self.weights) <= 0):
            raise ValueError(f"weights: must be {len(self.values)} non-negative numbers (one per value) with a "
                             f"positive sum, got {list(self.weights)}")

    @property
    def max_len(self) -> int:
        return {"fixed": self.value, "choice": max(self.values or (0,))}.get(self.dist, self.max)

    def sample(self, rng: np.random.Generator) -> int:
        if self.dist == "fixed":
            return self.value
        if self.dist == "uniform":
            return int(rng.integers(self.min, self.max, endpoint=True))
        if self.dist == "normal":
            return int(np.clip(round(rng.normal(self.mean, self.std)), self.min, self.max))
        p = np.asarray(self.weights, dtype=float) / sum(self.weights) if self.weights else None
        return int(rng.choice(self.values, p=p))


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in the mix; `weight` is its relative share of requests."""

    name: str = "default"
    weight: float = 1.0
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist(value=128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist(value=64))

    def __post_init__(self):
        _check_numbers(self, ("weight",))
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight!r}")


@dataclass(frozen=True)
class SharedPrefix:
    """Requests fall into `num_groups` groups sharing a system prompt of `prefix_len` tokens (RAG, agents). The
    request class's prompt_len is then the length of the question that follows it."""

    num_groups: int = 4
    prefix_len: LengthDist = field(default_factory=lambda: LengthDist(value=1024))

    def __post_init__(self):
        _check_ints(self, ("num_groups",))
        if self.num_groups < 1:
            raise ValueError(f"num_groups: must be >= 1, got {self.num_groups!r}")


@dataclass(frozen=True)
class SLO:
    """Per-request latency objectives in milliseconds; None = no bound. A request is good when it succeeds and
    meets every one (vLLM's --goodput)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self):
        _check_numbers(self, ("ttft_ms", "tpot_ms", "e2el_ms"))
        for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}: must be > 0 ms, got {v!r}")

    def met_by(self, ttft_ms: float, tpot_ms: float | None, e2el_ms: float) -> bool:
        # A one-token request has no TPOT; it cannot miss the TPOT bound.
        return ((self.ttft_ms is None or ttft_ms <= self.ttft_ms)
                and (self.tpot_ms is None or tpot_ms is None or tpot_ms <= self.tpot_ms)
                and (self.e2el_ms is None or e2el_ms <= self.e2el_ms))


@dataclass(frozen=True)
class Scenario:
    name: str
    arrival: Arrival
    requests: tuple[RequestClass, ...]
    description: str = ""
    # The run ends at whichever comes first; at least one is needed.
    duration_s: float | None = None
    num_requests: int | None = None
    shared_prefix: SharedPrefix | None = None
    slo: SLO = field(default_factory=SLO)
    seed: int = 0
    model: str | None = None  # None: the cluster's only model
    timeout_s: float = 300.0  # per-request gRPC deadline

    def __post_init__(self):
        _check_numbers(self, ("duration_s", "timeout_s"))
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("duration_s, num_requests: give at least one (the run ends at whichever comes first)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s: must be > 0, got {self.duration_s!r}")
        _check_ints(self, ("num_requests", "seed"))
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests: must be >= 1, got {self.num_requests!r}")
        if not self.requests:
            raise ValueError("requests: give at least one request class (or prompt_len and output_len)")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s!r}")

    @property
    def max_total_len(self) -> int:
        """The longest prompt plus output any request can have: must fit the served model's max_model_len."""
        prefix = self.shared_prefix.prefix_len.max_len if self.shared_prefix else 0
        return max(prefix + c.prompt_len.max_len + c.output_len.max_len for c in self.requests)

    def with_overrides(self, *, duration_s: float | None = None, num_requests: int | None = None,
                       rate: float | None = None, concurrency: int | None = None, seed: int | None = None,
                       model: str | None = None) -> "Scenario":
        """The CLI's overrides. A duration alone replaces the scenario's request count (and vice versa); a rate
        makes a closed-loop scenario Poisson; a concurrency makes any scenario closed loop."""
        changes: dict[str, Any] = {}
        if duration_s is not None or num_requests is not None:
            changes.update(duration_s=duration_s, num_requests=num_requests)
        if rate is not None and concurrency is not None:
            raise ValueError("--rate, --concurrency: give one (open loop or closed loop)")
        if rate is not None:
            if self.arrival.process == "ramp":
                raise ValueError("--rate: a ramp scenario has start_rate and end_rate; edit them in the YAML")
            process = self.arrival.process if self.arrival.is_open_loop else "poisson"
            changes["arrival"] = Arrival(process=process, rate=rate, burstiness=self.arrival.burstiness)
        if concurrency is not None:
            changes["arrival"] = Arrival(process="concurrency", concurrency=concurrency)
        if seed is not None:
            changes["seed"] = seed
        if model is not None:
            changes["model"] = model
        return dataclasses.replace(self, **changes)


def _check_numbers(obj, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{name}: must be a number, got {v!r}")


def _check_ints(obj, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{name}: must be a whole number, got {v!r}")


# --- YAML -----------------------------------------------------------------------------------------------

def scenario_names() -> list[str]:
    """The scenarios shipped in loadtest/scenarios/."""
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A shipped scenario by name (`chat`) or a YAML file by path. Raises ValueError naming the bad field."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIOS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"scenario: {str(name_or_path)!r} is neither a shipped scenario "
                         f"({', '.join(scenario_names())}) nor a YAML file")
    data = yaml.safe_load(path.read_text())
    return scenario_from_dict(data, default_name=path.stem)


def scenario_from_dict(data: Any, default_name: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ValueError(f"scenario: must be a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    if "requests" in data and ({"prompt_len", "output_len"} & data.keys()):
        raise ValueError("requests: give either a requests list or prompt_len/output_len, not both")
    if "requests" in data:
        classes = data.pop("requests")
        if not isinstance(classes, list):
            raise ValueError("requests: must be a list of request classes (name, weight, prompt_len, output_len)")
    else:
        # The one-class shorthand: prompt_len and output_len at the top level.
        classes = [{k: data.pop(k) for k in ("prompt_len", "output_len") if k in data}]
    kwargs = {"name": data.pop("name", default_name)}
    kwargs["requests"] = tuple(_request_class(c, f"requests[{i}]") for i, c in enumerate(classes))
    if "arrival" not in data:
        raise ValueError(f"arrival: required; one of the processes {', '.join(ARRIVAL_PROCESSES)}")
    kwargs["arrival"] = _build(Arrival, data.pop("arrival"), "arrival")
    if data.get("shared_prefix") is not None:
        sp = _mapping(data.pop("shared_prefix"), "shared_prefix")
        if "prefix_len" in sp:
            sp["prefix_len"] = _length(sp["prefix_len"], "shared_prefix.prefix_len")
        kwargs["shared_prefix"] = _build(SharedPrefix, sp, "shared_prefix")
    if "slo" in data:
        kwargs["slo"] = _build(SLO, data.pop("slo") or {}, "slo")
    return _build(Scenario, {**data, **kwargs}, "")


def _request_class(data: Any, where: str) -> RequestClass:
    data = _mapping(data, where)
    for key in ("prompt_len", "output_len"):
        if key not in data:
            raise ValueError(f"{where}.{key}: required (a length distribution)")
        data[key] = _length(data[key], f"{where}.{key}")
    return _build(RequestClass, data, where)


def _length(data: Any, where: str) -> LengthDist:
    if isinstance(data, int) and not isinstance(data, bool):
        data = {"dist": "fixed", "value": data}
    data = _mapping(data, where)
    for key in ("values", "weights"):
        if key in data:
            if not isinstance(data[key], list):
                raise ValueError(f"{where}.{key}: must be a list, got {data[key]!r}")
            data[key] = tuple(data[key])
    return _build(LengthDist, data, where)


def _mapping(data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a mapping, got {data!r}")
    return dict(data)


def _build(cls, data: Any, where: str):
    """cls(**data), with unknown keys and __post_init__ errors reported under the YAML path `where`."""
    data = _mapping(data, where or "scenario")
    prefix = f"{where}." if where else ""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field; allowed: {', '.join(allowed)}")
    try:
        return cls(**data)
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None
    except TypeError as e:  # e.g. a string where a number belongs
        raise ValueError(f"{where or 'scenario'}: {e}") from None
