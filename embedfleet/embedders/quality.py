"""How far a quantized model's vectors are from fp32, on the texts a job really embeds.

:func:`measure` embeds the same texts with the job's model and with its fp32 reference (the
same model and backend, unquantized: ONNX int8 against ONNX fp32, whose vectors agree with
torch fp32 to ~1e-6) and reports the mean and minimum cosine between the two vectors of each
text and the top-10 neighbour overlap: each text taken as a query over the others, the share
of fp32's 10 nearest neighbours the quantized vectors also rank in their 10 nearest. Cosine
says how much each vector moved; the overlap says whether retrieval notices.

Both models come from the worker's model cache (:func:`embedfleet.embedders.cache.get_embedder`),
so the measurement runs where the job's model already is and loads only the reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from embedfleet.config import EmbedderSpec
from embedfleet.embedders.cache import get_embedder

__all__ = ["NEIGHBOURS", "cosines", "measure", "reference_spec", "top_k_overlap"]

#: k of the neighbour overlap.
NEIGHBOURS = 10


def reference_spec(spec: EmbedderSpec) -> EmbedderSpec:
    """The fp32 model a quantized ``spec`` is compared with: same model, backend and device."""
    return dataclasses.replace(spec, quantize=None, precision="fp32")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped arrays of vectors."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def top_k_overlap(vectors: np.ndarray, reference: np.ndarray, *, k: int = NEIGHBOURS) -> float:
    """Each row as a query over the other rows: the share of ``reference``'s ``k`` nearest that
    ``vectors`` also rank in their ``k`` nearest, averaged over the rows.

    A row is never its own neighbour (it always would be, in both, and would lift every score
    by 1/k). Fewer than two rows have no neighbours: 1.0.
    """
    n = len(vectors)
    if n < 2:
        return 1.0
    k = min(k, n - 1)

    def nearest(v: np.ndarray) -> np.ndarray:
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        scores = v @ v.T
        np.fill_diagonal(scores, -np.inf)
        return np.argpartition(-scores, k - 1, axis=1)[:, :k]

    got, want = nearest(vectors), nearest(reference)
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got.tolist(), want.tolist())]))


def measure(spec: EmbedderSpec, texts: list[str], n_tokens: np.ndarray | None = None) -> dict:
    """The quality of ``spec``'s vectors of ``texts`` against its fp32 reference.

    ``{"samples", "mean_cosine", "min_cosine", "top10_overlap", "precision"}``; ``precision``
    is what the model says it ran at.
    """
    model = get_embedder(spec)
    reference = get_embedder(reference_spec(spec))
    got = model.embed_with_stats(texts, n_tokens, batch_tokens=spec.batch_tokens)[0]
    want = reference.embed_with_stats(texts, n_tokens, batch_tokens=spec.batch_tokens)[0]
    cos = cosines(np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32))
    return {
        "samples": len(texts),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top10_overlap": top_k_overlap(got, want, k=NEIGHBOURS),
        "precision": model.precision,
    }
