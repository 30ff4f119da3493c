"""The backends table of ``benchmarks/throughput.py --backends``: each embedder backend on the same chunks.

In this process each backend embeds the same chunks (embedfleet's own chunking of the corpus)
through :meth:`Embedder.embed_with_stats`, as a worker's embed task does, after loading and one
warm-up batch (so the rate is the embed stage's, not the load). All are loaded first and timed
in interleaved rounds (``--repeat``; the median round counts), so a drifting machine load
favours none of them:

* ``torch fp32`` (the baseline) and ``torch bf16`` (where the CPU has native bf16): the
  sentence-transformers backend;
* ``onnx fp32`` and ``onnx int8`` (dynamic, per channel): the onnx backend, exported once
  into a temporary model cache before timing;
* ``openvino fp32`` and ``openvino int8`` (static, calibrated on a random sample of
  ``calibration_samples`` of the chunks themselves): the openvino backend (sentence-transformers'
  ``backend="openvino"``), where ``embedfleet[openvino]`` is installed; otherwise the row says why.
  A backend that fails to load is a row saying why (the onnx export does not trace under the
  transformers 5.5 that the openvino extra needs).

For each: texts/s, the ratio to the baseline, the min and mean cosine of its vectors to the
baseline's, and the top-10 overlap: for ``queries`` chunks taken as queries, the share of
the baseline's 10 nearest chunks (by cosine over all the chunks) that the backend's vectors
also put in their 10 nearest, averaged. ``fp32 query`` is the same overlap with each query
embedded by the baseline instead (an fp32 query over the backend's vectors): what ``embedfleet
search`` does on an int8 collection. On python-docs it is as high as the int8 query's or higher
(the two quantization errors do not cancel), so search keeps embedding queries at fp32.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from embedfleet import config

TOP_K = 10


def _time(embedder, texts: list[str], counts: list[int]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    vectors, _stats = embedder.embed_with_stats(texts, counts)
    return time.perf_counter() - started, vectors


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def quality(vectors: np.ndarray, reference: np.ndarray, *, queries: int) -> dict[str, float]:
    """Cosine of each vector to its reference, and the top-10 overlap on ``queries`` sample queries,
    each embedded by the backend itself and by the reference."""
    a, b = _unit(vectors.astype(np.float32)), _unit(reference.astype(np.float32))
    cos = (a * b).sum(axis=1)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(a), size=min(queries, len(a)), replace=False)
    k = min(TOP_K, len(a))
    overlaps, fp32_query_overlaps = [], []
    for i in sample:
        want = set(np.argsort(-(b @ b[i]))[:k])
        overlaps.append(len(set(np.argsort(-(a @ a[i]))[:k]) & want) / k)
        fp32_query_overlaps.append(len(set(np.argsort(-(a @ b[i]))[:k]) & want) / k)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "top10_overlap": float(np.mean(overlaps)),
            "top10_overlap_fp32_query": float(np.mean(fp32_query_overlaps))}


def _variants() -> list[tuple[str, dict[str, Any]]]:
    from embedfleet.embedders.hardware import cpu_supports_bf16

    out = [("torch fp32", {"backend": "sentence-transformers", "precision": "fp32"})]
    out.append(("torch bf16", {"backend": "sentence-transformers", "precision": "bf16"}) if cpu_supports_bf16()
               else ("torch bf16", {"skip": "no native bf16 on this CPU (emulated bf16 is slower than fp32)"}))
    out += [("onnx fp32", {"backend": "onnx", "precision": "fp32"}),
            ("onnx int8", {"backend": "onnx", "precision": "fp32", "quantize": "int8"})]
    try:
        import optimum.intel.openvino  # noqa: F401
    except ImportError as exc:
        why = f"optimum-intel[openvino] not installed or not loadable: pip install 'embedfleet[openvino]' ({exc})"
        out += [("openvino fp32", {"skip": why}), ("openvino int8", {"skip": why})]
    else:
        out += [("openvino fp32", {"backend": "openvino", "precision": "fp32"}),
                ("openvino int8", {"backend": "openvino", "precision": "fp32", "quantize": "int8", "calibrate": True})]
    return out


def _calibrate_openvino(spec, texts: list[str], *, threads: int, samples: int) -> None:
    """Static int8 calibrated on a random sample of the corpus's own chunks (before the embedder
    loads it, so the cached int8 model is this one, not one calibrated on help topics)."""
    from embedfleet.embedders import openvino

    directory = openvino.export_model(spec.model.name, config.resolve_model_path(spec.model.path), spec.cache_dir)
    rng = np.random.default_rng(0)
    sample = [texts[i] for i in rng.choice(len(texts), size=min(samples, len(texts)), replace=False)]
    openvino.quantize_model(directory, calibration_texts=sample, threads=threads)


def backends_table(texts: list[str], counts: list[int], *, cache_dir: str, repeat: int = 1,
                   queries: int = 50, calibration_samples: int = 300) -> list[dict[str, Any]]:
    from embedfleet.embedders.registry import backend_factory

    threads = len(os.sched_getaffinity(0))
    rows: list[dict[str, Any]] = []
    loaded: list[tuple[dict[str, Any], Any]] = []
    for name, options in _variants():
        if "skip" in options:
            rows.append({"backend": name, "note": options["skip"]})
            continue
        calibrate = options.pop("calibrate", False)
        spec = config.embedder_spec(device="cpu", threads=threads, cache_dir=cache_dir, **options)
        started = time.perf_counter()
        try:
            if calibrate:
                _calibrate_openvino(spec, texts, threads=threads, samples=calibration_samples)
            # Not through the model cache, which would evict: every model stays loaded for the rounds.
            embedder = backend_factory(spec.backend, spec.backend_path)(spec)
        except Exception as exc:  # noqa: BLE001 - one backend that cannot load is a row, not the end of the table
            rows.append({"backend": name, "note": f"failed to load: {type(exc).__name__}: {exc}"[:300]})
            continue
        row = {"backend": name, "precision": embedder.precision,
               # an onnx/openvino row's first load includes the export (and the int8 one its calibration)
               "load_seconds": round(time.perf_counter() - started, 2)}
        embedder.embed_with_stats(texts[:32], counts[:32])  # warm-up: first-call allocations, kernels
        rows.append(row)
        loaded.append((row, embedder))
    # Interleaved rounds: on a shared machine the load drifts, and a backend timed only while it
    # was high would look slower than one timed later.
    seconds: dict[int, list[float]] = {id(row): [] for row, _ in loaded}
    vectors: dict[int, np.ndarray] = {}
    for _ in range(repeat):
        for row, embedder in loaded:
            took, vectors[id(row)] = _time(embedder, texts, counts)
            seconds[id(row)].append(took)
    if loaded:
        base_row = loaded[0][0]
        reference = vectors[id(base_row)]
        base_rate = len(texts) / float(np.median(seconds[id(base_row)]))
        for row, _ in loaded:
            rate = len(texts) / float(np.median(seconds[id(row)]))
            row.update({"texts_per_second": round(rate, 1), "ratio": round(rate / base_rate, 2)})
            row.update({k: round(v, 6) for k, v in quality(vectors[id(row)], reference, queries=queries).items()})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'backend':<15}{'texts/s':>9}{'ratio':>7}{'min cos':>10}{'mean cos':>10}{'top-10':>8}{'fp32 query':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "note" in r:
            lines.append(f"{r['backend']:<15}  {r['note']}")
            continue
        lines.append(f"{r['backend']:<15}{r['texts_per_second']:>9.1f}{r['ratio']:>6.2f}x{r['min_cosine']:>10.5f}"
                     f"{r['mean_cosine']:>10.5f}{r['top10_overlap']:>8.3f}{r['top10_overlap_fp32_query']:>12.3f}")
    return "\n".join(lines)

