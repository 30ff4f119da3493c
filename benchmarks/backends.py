"""The backends table of ``benchmarks/throughput.py --backends``: each embedder backend on the same chunks.

In this process, one after another, each backend embeds the same chunks (embedfleet's own
chunking of the corpus) through :meth:`Embedder.embed_with_stats`, as a worker's embed task
does, after loading and one warm-up batch (so the rate is the embed stage's, not the load):

* ``torch fp32`` (the baseline) and ``torch bf16`` (where the CPU has native bf16): the
  sentence-transformers backend;
* ``onnx fp32`` and ``onnx int8`` (dynamic, per channel): the onnx backend, exported once
  into a temporary model cache before timing;
* ``openvino fp32`` / ``int8``: only where sentence-transformers' OpenVINO backend can load
  (``optimum-intel[openvino]``); otherwise the row says why.

For each: texts/s, the ratio to the baseline, the min and mean cosine of its vectors to the
baseline's, and the top-10 overlap: for ``queries`` chunks taken as queries, the share of
the baseline's 10 nearest chunks (by cosine over all the chunks) that the backend's vectors
also put in their 10 nearest, averaged.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from embedfleet import config

TOP_K = 10


def _rate(embedder, texts: list[str], counts: list[int], repeat: int) -> tuple[float, np.ndarray]:
    embedder.embed_with_stats(texts[:32], counts[:32])  # warm-up: first-call allocations, kernels
    seconds = []
    vectors = None
    for _ in range(repeat):
        started = time.perf_counter()
        vectors, _stats = embedder.embed_with_stats(texts, counts)
        seconds.append(time.perf_counter() - started)
    return len(texts) / float(np.median(seconds)), vectors


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def quality(vectors: np.ndarray, reference: np.ndarray, *, queries: int) -> dict[str, float]:
    """Cosine of each vector to its reference, and the top-10 overlap on ``queries`` sample queries."""
    a, b = _unit(vectors.astype(np.float32)), _unit(reference.astype(np.float32))
    cos = (a * b).sum(axis=1)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(a), size=min(queries, len(a)), replace=False)
    k = min(TOP_K, len(a))
    overlaps = []
    for i in sample:
        got = set(np.argsort(-(a @ a[i]))[:k])
        want = set(np.argsort(-(b @ b[i]))[:k])
        overlaps.append(len(got & want) / k)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "top10_overlap": float(np.mean(overlaps))}


def _variants() -> list[tuple[str, dict[str, Any]]]:
    from embedfleet.embedders.hardware import cpu_supports_bf16

    out = [("torch fp32", {"backend": "sentence-transformers", "precision": "fp32"})]
    out.append(("torch bf16", {"backend": "sentence-transformers", "precision": "bf16"}) if cpu_supports_bf16()
               else ("torch bf16", {"skip": "no native bf16 on this CPU (emulated bf16 is slower than fp32)"}))
    out += [("onnx fp32", {"backend": "onnx", "precision": "fp32"}),
            ("onnx int8", {"backend": "onnx", "precision": "fp32", "quantize": "int8"})]
    try:
        import optimum.intel  # noqa: F401
    except ImportError as exc:
        why = f"optimum-intel[openvino] not installed ({exc})"
        out += [("openvino fp32", {"skip": why}), ("openvino int8", {"skip": why})]
    else:
        why = "not wired: embedfleet has no openvino backend yet"
        out += [("openvino fp32", {"skip": why}), ("openvino int8", {"skip": why})]
    return out


def backends_table(texts: list[str], counts: list[int], *, cache_dir: str, repeat: int = 1,
                   queries: int = 50) -> list[dict[str, Any]]:
    from embedfleet.embedders.cache import clear, get_embedder

    threads = len(os.sched_getaffinity(0))
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    base_rate = None
    for name, options in _variants():
        if "skip" in options:
            rows.append({"backend": name, "note": options["skip"]})
            continue
        spec = config.embedder_spec(device="cpu", threads=threads, cache_dir=cache_dir, **options)
        started = time.perf_counter()
        embedder = get_embedder(spec)
        load_seconds = time.perf_counter() - started  # an onnx row's first load includes the export
        rate, vectors = _rate(embedder, texts, counts, repeat)
        row: dict[str, Any] = {"backend": name, "precision": embedder.precision, "texts_per_second": round(rate, 1),
                               "load_seconds": round(load_seconds, 2)}
        if reference is None:
            reference, base_rate = vectors, rate
        row["ratio"] = round(rate / base_rate, 2)
        row.update({k: round(v, 6) for k, v in quality(vectors, reference, queries=queries).items()})
        rows.append(row)
        clear()  # one model resident at a time: the next one's rate is not shared with it
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'backend':<15}{'texts/s':>9}{'ratio':>7}{'min cos':>10}{'mean cos':>10}{'top-10':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "note" in r:
            lines.append(f"{r['backend']:<15}  {r['note']}")
            continue
        lines.append(f"{r['backend']:<15}{r['texts_per_second']:>9.1f}{r['ratio']:>6.2f}x{r['min_cosine']:>10.5f}"
                     f"{r['mean_cosine']:>10.5f}{r['top10_overlap']:>8.3f}")
    return "\n".join(lines)

