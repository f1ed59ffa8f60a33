"""CUDA-graph decode on CPU: a stand-in graph (capture runs the step once, replay reruns it into the captured
output) drives the runner's buffers, bucketing and padding exactly as a real graph would."""
import random
from types import SimpleNamespace

import pytest
import torch

from workers.config import CacheConfig, EngineConfig
from workers.model.backends.base import DecodeMetadata, SeqSpan
from workers.model.config import ModelConfig
from workers.model.cuda_graph import CUDAGraphRunner, default_capture_sizes
from workers.model.loader import ModelSource
from workers.model_runner import ModelInput, ModelRunner
from workers.parallel import TPGroup

BLOCK_SIZE = 4
MAX_BLOCKS = 16  # 64 tokens per sequence


class RerunGraph:
    """Stand-in for torch.cuda.CUDAGraph on CPU: replay reruns the captured function and writes its result into
    the tensor capture returned, so results only reach the caller through the captured output, as on a GPU."""

    def capture(self, fn):
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        self.out.copy_(self.fn())


def decode_input(contexts: list[int], block_ids: list[list[int]], token_ids: list[int],
                 logits_indices: list[int] | None = None) -> ModelInput:
    n = len(contexts)
    return ModelInput(
        input_ids=torch.tensor(token_ids, dtype=torch.long),
        positions=torch.tensor(contexts, dtype=torch.long),
        spans=[SeqSpan(c, 1, b) for c, b in zip(contexts, block_ids)],
        logits_indices=torch.tensor(list(range(n)) if logits_indices is None else logits_indices, dtype=torch.long),
    )


# --- the runner's bookkeeping, over a fake model whose "logits" echo each row's inputs ------------------------


class RecordingBackend:
    def __init__(self):
        self.metas = []

    def build_decode_metadata(self, slot_mapping, block_tables, seq_lens, block_size):
        meta = DecodeMetadata(slot_mapping, block_tables, seq_lens, block_size)
        self.metas.append(meta)
        return meta


def echo_logits(input_ids, positions, meta):
    """[bs, 5 + MAX_BLOCKS]: id, position, slot, seq_len, then the block-table row, as floats."""
    cols = [input_ids, positions, meta.slot_mapping, meta.seq_lens.long(), meta.block_tables.long().sum(1)]
    return torch.cat([torch.stack(cols, 1), meta.block_tables.long()], 1).float()


def echo_runner(capture_sizes=(1, 2, 4, 8), capture=True) -> CUDAGraphRunner:
    runner = CUDAGraphRunner(
        echo_logits, RecordingBackend(), capture_sizes=list(capture_sizes), max_num_blocks_per_seq=MAX_BLOCKS,
        block_size=BLOCK_SIZE, vocab_size=5 + MAX_BLOCKS, device="cpu", graph_factory=RerunGraph,
    )
    if capture:
        runner.capture()
    return runner


def test_default_capture_sizes_follow_vllms_ladder_up_to_max_num_seqs():
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(3) == [1, 2, 3]
    assert default_capture_sizes(8) == [1, 2, 4, 8]
    assert default_capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert default_capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError, match="max_num_seqs"):
        default_capture_sizes(0)


def test_a_batch_takes_the_smallest_bucket_that_holds_it():
    runner = echo_runner(capture_sizes=[8, 1, 4, 2, 4])
    assert runner.capture_sizes == [1, 2, 4, 8]
    assert [runner.bucket(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="above the largest"):
        runner.bucket(9)


def test_capture_goes_largest_first_and_logs_it(caplog):
    sizes = []
    runner = echo_runner(capture=False)
    runner.graph_factory = lambda: SimpleNamespace(capture=lambda fn: sizes.append(fn().shape[0]), replay=None)
    with caplog.at_level("INFO", logger="workers.model.cuda_graph"):
        runner.capture()
    assert sizes == [8, 4, 2, 1]
    assert "captured 4 decode batch sizes (1..8)" in caplog.text


def test_supports_only_decode_batches_that_fit_a_captured_bucket():
    runner = echo_runner()
    blocks = [list(range(MAX_BLOCKS))] * 9
    assert runner.supports(decode_input([5] * 8, blocks[:8], [1] * 8))
    assert not echo_runner(capture=False).supports(decode_input([5], blocks[:1], [1])), "nothing captured yet"
    assert not runner.supports(decode_input([5] * 9, blocks, [1] * 9)), "above the largest bucket"
    spans = [SeqSpan(5, 1, blocks[0]), SeqSpan(0, 2, blocks[1])]
    prefill = ModelInput(torch.tensor([1, 2, 3]), torch.tensor([5, 0, 1]), spans, torch.tensor([0, 2]))
    assert not runner.supports(prefill), "a prefill chunk runs eagerly"
    last = MAX_BLOCKS * BLOCK_SIZE - 1
    assert runner.supports(decode_input([last], blocks[:1], [1])), "the new token fills the last slot of the table"
    too_long = decode_input([last + 1], [list(range(MAX_BLOCKS + 1))], [1])
    assert not runner.supports(too_long), "its new token needs one block more than a table row holds"


def test_run_fills_real_rows_pads_the_bucket_and_returns_the_sampled_rows():
    runner = echo_runner()
    contexts, blocks = [0, 3, 4, 9], [[7], [2], [5, 11], [1, 3, 6]]
    got = runner.run(decode_input(contexts, blocks, [10, 11, 12, 13], logits_indices=[0, 2]))
    # slot = block_ids[p // 4] * 4 + p % 4 for p = context_len; seq_len = context_len + 1
    assert got[:, :4].tolist() == [[10, 0, 28, 1], [12, 4, 44, 5]]
    assert got[1, 5:7].tolist() == [5, 11] and got[1, 7:].abs().sum() == 0, "only the blocks up to the new token"
    assert got.shape == (2, 5 + MAX_BLOCKS) and got.dtype == torch.float32
    assert runner.logits[3, :4].tolist() == [13, 9, 25, 10]

    # Three sequences in bucket 4: the stale row 3 becomes padding.
    got = runner.run(decode_input(contexts[1:], blocks[1:], [21, 22, 23]))
    assert got[:, :4].tolist() == [[21, 3, 11, 4], [22, 4, 44, 5], [23, 9, 25, 10]]
    assert runner.input_ids[3] == 0 and runner.positions[3] == 0
    assert runner.slot_mapping[3] == -1 and runner.seq_lens[3] == 0 and runner.block_tables[3].abs().sum() == 0
    assert runner.logits[3, :4].tolist() == [0, 0, -1, 0]


def test_every_bucket_reads_views_of_one_set_of_buffers():
    runner = echo_runner()
    names = ("input_ids", "slot_mapping", "block_tables", "seq_lens", "logits")
    ptrs = [getattr(runner, name).data_ptr() for name in names]
    metas = runner.backend.metas
    metas.clear()
    for n in (1, 3, 8, 2):
        runner.run(decode_input([0] * n, [[n]] * n, [n] * n))
    assert [getattr(runner, name).data_ptr() for name in names] == ptrs
    assert [m.slot_mapping.shape[0] for m in metas] == [1, 4, 8, 2]
    assert {m.slot_mapping.data_ptr() for m in metas} == {ptrs[1]}
    assert {m.block_tables.data_ptr() for m in metas} == {ptrs[2]}
    assert {m.seq_lens.data_ptr() for m in metas} == {ptrs[3]}


# --- a tiny Llama: the replayed logits are the eager runner's -------------------------------------------------

TINY = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=256, tie_word_embeddings=False, name="tiny",
)


@pytest.fixture(scope="module")
def eager_runner() -> ModelRunner:
    config = EngineConfig(device="cpu", dtype="float32", attention_backend="sdpa",
                          cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=1 << 24))
    source = ModelSource(path=None, kind="dummy", gguf_file=None, dummy_arch=None, name="tiny")
    runner = ModelRunner(config, TINY, source, TPGroup(), max_model_len=MAX_BLOCKS * BLOCK_SIZE)
    # Weights larger than the dummy's 0.02 so that attention (the context) moves the logits visibly.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in runner.model.named_parameters():
            if not name.endswith("norm.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    runner.model.lm_head.keep_transposed_copy()
    runner.allocate_kv_cache(512)
    return runner


@pytest.fixture(scope="module")
def graph_runner(eager_runner) -> CUDAGraphRunner:
    r = eager_runner

    def forward_logits(input_ids, positions, meta):
        return r.model.compute_logits(r.model(input_ids, positions, r.layer_caches, r.backend, meta)).float()

    runner = CUDAGraphRunner(
        forward_logits, r.backend, capture_sizes=[1, 2, 4, 8, 16, 24], max_num_blocks_per_seq=MAX_BLOCKS,
        block_size=BLOCK_SIZE, vocab_size=TINY.vocab_size, device="cpu", graph_factory=RerunGraph,
    )
    runner.capture()
    return runner


class Sequences:
    """Prompts prefilled eagerly into their own (shuffled) blocks; then decode steps, one token each."""

    def __init__(self, runner: ModelRunner, prompt_lens: list[int], seed: int, vocab_size: int = TINY.vocab_size,
                 max_blocks: int = MAX_BLOCKS):
        rng = random.Random(seed)
        free = list(range(runner.num_blocks))
        rng.shuffle(free)
        self.block_ids = [[free.pop() for _ in range(max_blocks)] for _ in prompt_lens]
        self.contexts = list(prompt_lens)
        self.rng = rng
        self.vocab_size = vocab_size
        tokens = [[rng.randrange(vocab_size) for _ in range(n)] for n in prompt_lens]
        runner.execute(ModelInput(
            input_ids=torch.tensor(sum(tokens, [])),
            positions=torch.tensor([p for n in prompt_lens for p in range(n)]),
            spans=[SeqSpan(0, n, b) for n, b in zip(prompt_lens, self.block_ids)],
            logits_indices=torch.tensor([], dtype=torch.long),
        ))

    def next_step(self) -> ModelInput:
        tokens = [self.rng.randrange(self.vocab_size) for _ in self.contexts]
        return decode_input(self.contexts, self.block_ids, tokens)

    def advance(self) -> None:
        self.contexts = [c + 1 for c in self.contexts]


def prompt_lens(n: int) -> list[int]:
    # Ragged, with new tokens that start a block of 4 (len 4k), fill one (4k + 3) or sit inside one.
    return [[4, 7, 1, 8, 13, 19, 24, 31, 2, 36, 11, 40, 27, 16, 3, 45, 22][i % 17] for i in range(n)]


@pytest.mark.parametrize("n", [1, 3, 17])
def test_replayed_logits_match_the_eager_runner(eager_runner, graph_runner, n):
    seqs = Sequences(eager_runner, prompt_lens(n), seed=n)
    for _ in range(2):
        inp = seqs.next_step()
        got = graph_runner.run(inp)
        expected = eager_runner.execute(inp)  # writes the same k/v into the same slots
        assert got.shape == (n, TINY.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        seqs.advance()


def test_one_bucket_replayed_with_new_contents_is_right_both_times(eager_runner, graph_runner):
    a = Sequences(eager_runner, [5, 12, 8], seed=100)
    b = Sequences(eager_runner, [30, 2, 17], seed=200)
    first, second = a.next_step(), b.next_step()
    got_first = graph_runner.run(first)
    got_second = graph_runner.run(second)  # bucket 4 again, other sequences and contexts
    torch.testing.assert_close(got_first, eager_runner.execute(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_second, eager_runner.execute(second), rtol=1e-5, atol=1e-5)
    # The context matters: the same token after other sequences' contexts scores differently.
    other = decode_input(b.contexts, b.block_ids, first.input_ids.tolist())
    assert (graph_runner.run(other) - got_first).abs().max() > 0.1
