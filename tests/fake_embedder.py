"""A deterministic embedder with no model: vectors derived from a hash of the text.

For tests and for measuring the pipeline's own overhead (``--backend fake``): the vectors
carry no meaning. Not shipped with the package: it is added through the registry's
``embedfleet.backends`` config key (:data:`BACKEND`), which tests/conftest.py sets for the test
session and its subprocesses and the benchmarks set for their runs, so workers load it like
any other backend (they need the repository root on their path).
"""

from __future__ import annotations

import hashlib

import numpy as np

from embedfleet.config import EmbedderSpec
from embedfleet.embedders.base import Embedder

__all__ = ["BACKEND", "NAME", "FakeEmbedder", "fake_vector"]

#: The registry entry: embedfleet.backends.fake.
NAME = "fake"
BACKEND = "tests.fake_embedder:FakeEmbedder"


def fake_vector(text: str, dimensions: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeEmbedder(Embedder):
    def __init__(self, spec: EmbedderSpec):
        super().__init__(spec)
        self.precision = "fp32"
        self.memory_bytes = 0

    def _encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([fake_vector(t, self.dimensions) for t in texts]) if texts else np.zeros((0, self.dimensions), np.float32)
