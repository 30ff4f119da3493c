"""The Embedder interface and the token-budget batching every backend shares."""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from embedfleet.config import EmbedderSpec

__all__ = ["Embedder", "BatchStats", "plan_batches"]

# [CLS] and [SEP]: every text the model sees is this much longer than its content tokens.
SPECIAL_TOKENS = 2


@dataclass
class BatchStats:
    texts: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def padding_efficiency(self) -> float | None:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else None

    def add(self, other: "BatchStats") -> None:
        self.texts += other.texts
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        self.batches += other.batches
        self.seconds += other.seconds


def plan_batches(n_tokens: Sequence[int], batch_tokens: int) -> list[np.ndarray]:
    """Index arrays of batches, longest texts first, each within ``batch_tokens`` padded tokens.

    Sorting by length keeps texts of similar length together, so the padding every batch
    pays (batch size x its longest text) stays close to the real token count. A single text
    longer than the budget still gets a batch of its own.
    """
    lengths = np.asarray(n_tokens, dtype=np.int64) + SPECIAL_TOKENS
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]  # descending order: the first text is the longest
        size = max(1, int(batch_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


class Embedder(abc.ABC):
    """One loaded model. Backends implement :meth:`_encode`; batching is shared."""

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
        """One forward pass over ``texts``: float32 (n, dimensions), normalised if the model says so."""

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
        lengths = np.minimum(np.asarray(n_tokens, dtype=np.int64), self.max_seq_length - SPECIAL_TOKENS)
        prefix = self.spec.model.document_prefix
        started = time.perf_counter()
        for batch in plan_batches(lengths, batch_tokens or self.spec.batch_tokens):
            batch_texts = [prefix + texts[i] for i in batch]
            out[batch] = self._encode(batch_texts)
            stats.batches += 1
            stats.real_tokens += int((lengths[batch] + SPECIAL_TOKENS).sum())
            stats.padded_tokens += int((lengths[batch].max() + SPECIAL_TOKENS) * len(batch))
        stats.seconds = time.perf_counter() - started
        return out, stats

    def embed_query(self, text: str) -> np.ndarray:
        return self._encode([self.spec.model.query_prefix + text])[0]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Content tokens per text (no special tokens); backends with a tokenizer override this."""
        return [max(1, len(t) // 4) for t in texts]
