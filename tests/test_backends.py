"""The backends table's quality measures (benchmarks/backends.py): cosines and top-10 overlap."""

from __future__ import annotations

import numpy as np

from benchmarks.backends import format_table, quality


def _noisy_pair(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference vectors and a noisy copy of them (noise half the vectors' own scale)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(n, 16)).astype(np.float32)
    return ref + rng.normal(scale=0.5, size=ref.shape).astype(np.float32), ref


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_identical_vectors_agree_fully():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 16)).astype(np.float32)
    q = quality(ref * 3.0, ref, queries=10)  # scale does not matter: cosine
    assert q["min_cosine"] >= 0.99999 and q["mean_cosine"] >= 0.99999 and q["top10_overlap"] == 1.0
    assert q["top10_overlap_fp32_query"] == 1.0


def test_noise_lowers_cosine_and_overlap_measurably():
    noisy, ref = _noisy_pair(2, 200)
    q = quality(noisy, ref, queries=50)
    cos = (_unit(noisy) * _unit(ref)).sum(axis=1)
    assert abs(q["min_cosine"] - cos.min()) < 1e-5 and abs(q["mean_cosine"] - cos.mean()) < 1e-5
    # The top-10 of each query includes the query itself in both; the rest shuffles with the noise.
    assert 0.1 <= q["top10_overlap"] < 0.9


def test_fp32_query_overlap_ranks_the_noisy_vectors_by_the_reference_query():
    noisy, ref = _noisy_pair(3, 120)
    q = quality(noisy, ref, queries=30)
    a, b = _unit(noisy), _unit(ref)
    sample = np.random.default_rng(0).choice(len(a), size=30, replace=False)
    expected = np.mean([len(set(np.argsort(-(a @ b[i]))[:10]) & set(np.argsort(-(b @ b[i]))[:10])) / 10 for i in sample])
    assert abs(q["top10_overlap_fp32_query"] - expected) < 1e-9
    assert 0.1 <= q["top10_overlap_fp32_query"] < 0.9


def test_table_has_a_row_per_backend_and_says_why_one_is_missing():
    rows = [
        {"backend": "torch fp32", "texts_per_second": 26.0, "ratio": 1.0, "min_cosine": 1.0, "mean_cosine": 1.0,
         "top10_overlap": 1.0, "top10_overlap_fp32_query": 1.0},
        {"backend": "openvino int8", "note": "optimum-intel[openvino] not installed"},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["backend", "texts/s", "ratio", "min", "cos", "mean", "cos", "top-10", "fp32", "query"]
    assert lines[2].split() == ["torch", "fp32", "26.0", "1.00x", "1.00000", "1.00000", "1.000", "1.000"]
    assert lines[3].split()[:2] == ["openvino", "int8"] and "not installed" in lines[3]
