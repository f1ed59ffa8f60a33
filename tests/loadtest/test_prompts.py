"""Prompts made with the default model's real tokenizer: exact lengths, English text, no accidental shared
prefixes, deliberate ones for rag, and the same requests for the same seed."""
from __future__ import annotations

import dataclasses

import pytest

from loadtest.prompts import RequestFactory, load_tokenizer, open_loop_plan
from loadtest.scenario import load_scenario, scenario_from_dict

BLOCK = 16  # a prefix-cache block: prompts that differ in their first block share nothing


def _scenario(**fields):
    return scenario_from_dict({"arrival": {"process": "poisson", "rate": 2.0}, "num_requests": 20, **fields})


def test_prompts_have_exact_token_counts_and_read_as_english(tokenizer):
    scenario = _scenario(prompt_len={"dist": "choice", "values": [7, 100, 1500]},
                         output_len={"dist": "uniform", "min": 5, "max": 9})
    factory = RequestFactory(scenario, tokenizer)
    specs = [factory.make(i) for i in range(20)]
    assert {len(s.prompt_ids) for s in specs} == {7, 100, 1500}
    assert all(5 <= s.max_tokens <= 9 for s in specs)
    text = tokenizer.decode(max(specs, key=lambda s: len(s.prompt_ids)).prompt_ids)
    assert text.startswith("Ticket ") and " the " in text and text.count(".") > 20


def test_unrelated_prompts_differ_in_their_first_block(tokenizer):
    factory = RequestFactory(_scenario(prompt_len=64, output_len=8), tokenizer)
    heads = {factory.make(i).prompt_ids[:BLOCK] for i in range(50)}
    assert len(heads) == 50


def test_rag_groups_share_their_system_prompt(tokenizer):
    scenario = dataclasses.replace(load_scenario("rag"), num_requests=24, duration_s=None)
    specs = open_loop_plan(scenario, RequestFactory(scenario, tokenizer))
    groups: dict[int, list] = {}
    for s in specs:
        groups.setdefault(s.group, []).append(s)
    assert len(groups) == 4 and all(len(g) >= 2 for g in groups.values())
    prefixes = {}
    for group, members in groups.items():
        first = members[0].prompt_ids
        # The system prompt is the shared part; each question after it is the request's own.
        shared = min(next(i for i, (a, b) in enumerate(zip(first, m.prompt_ids)) if a != b) for m in members[1:])
        assert 1024 <= shared <= 1792
        prefixes[group] = first[:shared]
        for m in members:
            # The question (32-96 tokens) starts with "Ticket", which the group members share too.
            assert 32 - 4 <= len(m.prompt_ids) - shared <= 96
    assert len({p[:BLOCK] for p in prefixes.values()}) == 4  # different groups share nothing


def test_same_seed_same_requests_and_times(tokenizer):
    scenario = dataclasses.replace(load_scenario("mixed"), duration_s=20.0)
    a = open_loop_plan(scenario, RequestFactory(scenario, tokenizer))
    b = open_loop_plan(scenario, RequestFactory(scenario, tokenizer))
    other = dataclasses.replace(scenario, seed=1)
    c = open_loop_plan(other, RequestFactory(other, tokenizer))
    assert a == b and len(a) > 3
    assert [s.prompt_ids for s in a[:3]] != [s.prompt_ids for s in c[:3]]
    assert {s.kind for s in a} == {"decode-heavy", "long-prompt"}
    # Request i is the same whether made in a plan or alone (a closed loop makes them as it goes).
    assert RequestFactory(scenario, tokenizer).make(3, a[3].arrival_s) == a[3]


def test_tokenizer_from_a_gguf_file_or_a_saved_tokenizer_folder(tokenizer, tmp_path):
    from workers.model.loader import find_default_model

    text = "Prompts are cut to exact token counts."
    from_gguf = load_tokenizer(str(find_default_model()))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    from_folder = load_tokenizer(str(tmp_path / "tok"))
    assert from_gguf.encode(text) == from_folder.encode(text) == tokenizer.encode(text)
    with pytest.raises(ValueError, match="^--tokenizer: model: .* does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
