"""The Embedder interface and the token-budget batching every backend shares.

Batching
--------
A partition's texts are sorted by token count, longest first, and cut into batches whose
*padded* size (batch size x longest text in the batch, special tokens included) stays within
``batch_tokens``. Sorting keeps texts of similar length together, so padding waste is small
(reported as ``BatchStats.padding_efficiency``: real tokens / padded tokens), and the budget
keeps the memory of one forward pass bounded whatever the text lengths: short texts get big
batches, long texts small ones.

Out of memory
-------------
A backend declares which exceptions mean "the device ran out of memory"
(:meth:`Embedder.oom_error_types`, e.g. ``torch.OutOfMemoryError`` on CUDA). When a batch
raises one, the budget is halved, the texts not yet embedded are re-planned under it and
embedding continues; the halved budget is kept as a ceiling for the rest of the process's
life, so later partitions do not hit the same wall. A single text that does not fit raises
:class:`~embedfleet.errors.EmbeddingError`.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from embedfleet.config import EmbedderSpec
from embedfleet.errors import EmbeddingError

logger = logging.getLogger(__name__)

__all__ = ["Embedder", "BatchStats", "plan_batches"]

# [CLS] and [SEP]: every text the model sees is this much longer than its content tokens.
SPECIAL_TOKENS = 2

# Budgets measured with all-MiniLM-L6-v2 on 2 cores (AVX-512 + AVX512-BF16), ~200-token chunks,
# texts/s relative to SentenceTransformer.encode(batch_size=32) in the same process:
#   fp32 (torch):  1024: 1.13x  2048: 1.16x  4096: 1.10x  8192: 0.92x
#   bf16 (torch):  1024: 0.84x  2048: 0.88x  4096: 1.05x  8192: 1.02x   (of plain bf16)
#   onnx fp32:     1024: 1.22x  2048: 1.29x  4096: 1.10x  8192: 0.98x   (of torch at 2048)
# fp32 kernels prefer activations that stay in cache; bf16 kernels amortise a per-call weight
# reorder over bigger batches. Backends pick per precision (Embedder.default_batch_tokens).
# Re-measured with one torch thread in each of two processes (the default layout since): every
# budget from 1024 to 8192 within noise of the others, for fp32 (17-18 texts/s per process) and
# bf16 (29-31), so the defaults stand.
DEFAULT_BATCH_TOKENS = 4096

@dataclass
class BatchStats:
    texts: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0
    oom_retries: int = 0  # batches re-planned after the device ran out of memory
    batch_tokens: int = 0  # the budget actually used (after GPU growth / OOM halving)
    requests: int = 0  # HTTP requests made, retries included (remote backends)
    tokens_sent: int = 0  # tokens a remote provider embedded (its own count where it reports one)

    @property
    def padding_efficiency(self) -> float | None:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else None

    def add(self, other: "BatchStats") -> None:
        self.texts += other.texts
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        self.batches += other.batches
        self.seconds += other.seconds
        self.oom_retries += other.oom_retries
        self.batch_tokens = other.batch_tokens or self.batch_tokens
        self.requests += other.requests
        self.tokens_sent += other.tokens_sent


def plan_batches(n_tokens: Sequence[int], batch_tokens: int) -> list[np.ndarray]:
    """Index arrays of batches, longest texts first, each within ``batch_tokens`` padded tokens.

    ``n_tokens`` are content tokens; every text is counted with its special tokens. A single
    text longer than the budget still gets a batch of its own.
    """
    lengths = np.asarray(n_tokens, dtype=np.int64) + SPECIAL_TOKENS
    if lengths.size == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]
    batches: list[np.ndarray] = []
    start, n = 0, len(order)
    budget = max(1, int(batch_tokens))
    while start < n:
        # Descending order: the first text of a batch is its longest, so it fixes the padding.
        size = max(1, budget // int(ordered[start]))
        batches.append(order[start : start + size])
        start += size
    return batches


class Embedder(abc.ABC):
    """One loaded model. Backends implement :meth:`_encode`; batching is shared."""

    #: Lowered for good after an out-of-memory error (see the module docstring). A class
    #: default, so subclasses that do not call ``super().__init__`` still work.
    _oom_ceiling: int | None = None
    _prefix_tokens: int | None = None

    def __init__(self, spec: EmbedderSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.model.name

    @property
    def dimensions(self) -> int:
        return self.spec.model.dimensions

    @property
    def max_seq_length(self) -> int:
        return self.spec.model.max_seq_length

    #: The precision actually used after resolving "auto" for this worker's hardware.
    precision: str = "fp32"
    #: Bytes of parameters held; bounds the per-worker model cache.
    memory_bytes: int = 0

    @abc.abstractmethod
    def _encode(self, texts: list[str]) -> np.ndarray:
        """One forward pass over ``texts``: float32 (n, dimensions), normalised if the model says so.

        An out-of-memory error must propagate unwrapped (see :meth:`oom_error_types`).
        """

    @classmethod
    def oom_error_types(cls) -> tuple[type[BaseException], ...]:
        """Exceptions of :meth:`_encode` that mean the batch did not fit in device memory."""
        return (MemoryError,)

    def _is_oom(self, exc: BaseException) -> bool:
        """Whether ``exc`` from :meth:`_encode` means out of memory (override to match by message)."""
        return isinstance(exc, self.oom_error_types())

    def default_batch_tokens(self) -> int:
        """The budget when neither the call nor the spec names one (``embed.batch-tokens: null``)."""
        return DEFAULT_BATCH_TOKENS

    def _device_batch_tokens(self, requested: int) -> int:
        """The budget for this device; GPU backends grow it with free memory."""
        return requested

    def _after_oom(self) -> None:
        """Release what a failed batch left allocated (e.g. the CUDA caching allocator)."""

    def close(self) -> None:
        """Called after the worker cache dropped this model; release device caches.

        A task on another thread may still hold the embedder, so this must not break it: the
        model itself is freed by reference counting when its last user lets go.
        """

    def embed(self, texts: Sequence[str], n_tokens: Sequence[int] | None = None) -> np.ndarray:
        vectors, _ = self.embed_with_stats(texts, n_tokens)
        return vectors

    def embed_with_stats(
        self, texts: Sequence[str], n_tokens: Sequence[int] | None = None, *, batch_tokens: int | None = None
    ) -> tuple[np.ndarray, BatchStats]:
        texts = list(texts)
        stats = BatchStats(texts=len(texts))
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out, stats
        if n_tokens is None:
            n_tokens = self.count_tokens(texts)
        prefix = self.spec.model.document_prefix
        # The model sees prefix + text, truncated to its max sequence length: plan with that.
        lengths = np.minimum(
            np.asarray(n_tokens, dtype=np.int64) + self._prefix_length(prefix), self.max_seq_length - SPECIAL_TOKENS
        )
        budget = self._device_batch_tokens(int(batch_tokens or self.spec.batch_tokens or self.default_batch_tokens()))
        if self._oom_ceiling is not None:
            budget = min(budget, self._oom_ceiling)
        stats.batch_tokens = budget
        started = time.perf_counter()
        queue = deque(plan_batches(lengths, budget))
        while queue:
            batch = queue.popleft()
            try:
                out[batch] = self._encode([prefix + texts[i] for i in batch])
            except Exception as exc:
                if not self._is_oom(exc):
                    raise
                longest = int(lengths[batch].max()) + SPECIAL_TOKENS
                if len(batch) == 1:
                    raise EmbeddingError(
                        f"{self.name}: out of memory on a single text of {longest} tokens: {exc}"
                    ) from exc
                self._after_oom()
                # Halve what actually failed, not the nominal budget: a short last batch that
                # fails must be split too.
                budget = max(1, min(budget, len(batch) * longest) // 2)
                self._oom_ceiling = budget
                stats.oom_retries += 1
                stats.batch_tokens = budget
                logger.warning("%s: out of memory at %d padded tokens; batch budget halved to %d",
                               self.name, len(batch) * longest, budget)
                remaining = np.concatenate([batch, *queue])
                queue = deque(remaining[b] for b in plan_batches(lengths[remaining], budget))
                continue
            stats.batches += 1
            stats.real_tokens += int((lengths[batch] + SPECIAL_TOKENS).sum())
            stats.padded_tokens += int((lengths[batch].max() + SPECIAL_TOKENS) * len(batch))
        stats.seconds = time.perf_counter() - started
        return out, stats

    def _prefix_length(self, prefix: str) -> int:
        if not prefix:
            return 0
        if self._prefix_tokens is None:
            self._prefix_tokens = int(self.count_tokens([prefix])[0])
        return self._prefix_tokens

    def embed_query(self, text: str) -> np.ndarray:
        return self._encode([self.spec.model.query_prefix + text])[0]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Content tokens per text (no special tokens); backends with a tokenizer override this."""
        return [max(1, len(t) // 4) for t in texts]
