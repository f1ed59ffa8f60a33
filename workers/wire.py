"""Conversions between the engine's records and the tandem.v1 messages, shared by workers and routers."""
from __future__ import annotations

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


def sampling_params_from_proto(msg: pb.SamplingParams, *, with_stop_strings: bool = True) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults. Bad values raise ValueError naming the field."""
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL_FIELDS if msg.HasField(name)}
    if with_stop_strings and msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["ignore_eos"] = msg.ignore_eos
    kwargs["include_stop_str_in_output"] = msg.include_stop_str_in_output
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
