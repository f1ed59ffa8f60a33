"""Conversions between the engine's records and the tandem.v1 messages, shared by workers and routers."""
from __future__ import annotations

import math

from tandem.v1 import generation_pb2 as pb
from workers.sampling_params import SamplingParams

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
FINISH_REASON_NAMES = {v: k for k, v in FINISH_REASONS.items()}

_OPTIONAL_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "max_tokens", "min_tokens", "logprobs",
)


# The integer range each SamplingParams field has on the wire (its proto type: int64, int32 or uint32).
_INT_RANGES = {
    "seed": (-(1 << 63), (1 << 63) - 1),
    "top_k": (-(1 << 31), (1 << 31) - 1),
    "max_tokens": (0, (1 << 32) - 1),
    "min_tokens": (0, (1 << 32) - 1),
    "logprobs": (0, (1 << 32) - 1),
}
_UINT32_MAX = (1 << 32) - 1
_FLOAT32_MAX = 3.4028234663852886e38


def check_fits_proto(params: SamplingParams) -> None:
    """Raise ValueError naming the field when `params` cannot cross the wire as they are: an integer outside
    its proto type's range, or a float that float32 turns into infinity or into a value the field refuses
    (top_p=1e-50 becomes 0). Clients of the gRPC API cannot send such values; the HTTP front's JSON can."""
    for name, (lo, hi) in _INT_RANGES.items():
        value = getattr(params, name)
        if value is not None and value > hi:
            raise ValueError(f"{name}: must be <= {hi}, got {value}")
        if value is not None and value < lo:
            raise ValueError(f"{name}: must be >= {lo}, got {value}")
    for t in (*params.stop_token_ids, *params.logit_bias):
        if t > _UINT32_MAX:
            field = "stop_token_ids" if t in params.stop_token_ids else "logit_bias"
            raise ValueError(f"{field}: token id {t} is out of range")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if math.isfinite(value) and abs(value) > _FLOAT32_MAX:
            raise ValueError(f"{name}: must be at most {_FLOAT32_MAX:.4g} in magnitude, got {value}")
    sampling_params_from_proto(sampling_params_to_proto(params))  # float32 rounding keeps every value valid


def sampling_params_from_proto(msg: pb.SamplingParams, *, with_stop_strings: bool = True) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Bad values raise ValueError naming the field."""
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL_FIELDS if msg.HasField(name)}
    if with_stop_strings and msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["ignore_eos"] = msg.ignore_eos
    kwargs["include_stop_str_in_output"] = msg.include_stop_str_in_output
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    return SamplingParams(**kwargs)


def sampling_params_to_proto(params: SamplingParams, *, with_stop_strings: bool = True) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, min_tokens=params.min_tokens,
        stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
        include_stop_str_in_output=params.include_stop_str_in_output,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.max_tokens is not None:
        msg.max_tokens = params.max_tokens
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if with_stop_strings:
        msg.stop.extend(params.stop)
    msg.logit_bias.update(params.logit_bias)
    return msg


def logprobs_to_proto(token_ids: list[int], logprobs: list[dict[int, float]] | None) -> list[pb.TokenLogprob]:
    """The engine's per-token {token_id: logprob} (sampled token first, then the top-n) as TokenLogprob."""
    if logprobs is None:
        return []
    out = []
    for tok, entry in zip(token_ids, logprobs):
        top = [pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.items()]
        out.append(pb.TokenLogprob(token_id=tok, logprob=entry[tok], top_logprobs=top))
    return out
