"""Varied prompts for correctness tests: raw and chat-templated, short and about 1k tokens."""

_PARAGRAPHS = [
    "The history of computing is a story of layers. Each generation of engineers built abstractions on top of the "
    "last: transistors became logic gates, gates became processors, processors ran operating systems, and those "
    "systems hosted the applications that people use every day.",
    "In 1969 the ARPANET connected four computers at universities in the western United States. Within two decades "
    "its descendants linked millions of machines, and the protocols designed for a small research network carried "
    "email, file transfers, and eventually the World Wide Web.",
    "A good recipe for bread needs only flour, water, salt and yeast. The baker mixes them, lets the dough rise for "
    "several hours, shapes the loaves, and bakes them in a very hot oven until the crust is deep brown.",
    "Mountains form where tectonic plates collide. The Himalayas, still rising by a few millimetres each year, are "
    "the result of the Indian plate pushing north into the Eurasian plate over tens of millions of years.",
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    mid = len(items) // 2\n"
    "    left = merge_sort(items[:mid])\n    right = merge_sort(items[mid:])\n    return merge(left, right)\n",
]


def long_document(num_paragraphs: int = 24) -> str:
    """About 1k tokens of varied text with numbered sections."""
    parts = [f"Section {i + 1}. {_PARAGRAPHS[i % len(_PARAGRAPHS)]}" for i in range(num_paragraphs)]
    return "\n\n".join(parts)


RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
    long_document() + "\n\nIn summary, the sections above describe",
]

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": long_document() + "\n\nSummarize the text above in two sentences."}],
]


def prompt_token_ids(tokenizer) -> list[list[int]]:
    """Token ids of all 8 prompts: raw ones encoded as is, chat ones through the chat template."""
    ids = [tokenizer.encode(p) for p in RAW_PROMPTS]
    for conv in CHAT_PROMPTS:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer.encode(text, add_special_tokens=False))
    return ids
