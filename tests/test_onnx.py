"""The ONNX Runtime backend: same vectors as sentence-transformers, exported once, int8 opt-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from embedfleet import config
from embedfleet.embedders import onnx as onnx_backend
from embedfleet.errors import BackendUnavailableError
from tests.conftest import help_topic_chunks

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def real_texts():
    """Chunks of Python's help topics, as the pipeline makes them (~200 tokens, some shorter)."""
    return help_topic_chunks(topics=20, limit=64)


@pytest.fixture(scope="module")
def onnx_embedder(cache_dir):
    from embedfleet.embedders.onnx import OnnxEmbedder

    return OnnxEmbedder(config.embedder_spec(backend="onnx", device="cpu", cache_dir=cache_dir))


@pytest.mark.slow
def test_onnx_matches_sentence_transformers(onnx_embedder, real_texts):
    from sentence_transformers import SentenceTransformer

    texts, counts = real_texts
    plain = SentenceTransformer(config.resolve_model_path(onnx_embedder.spec.model.path), device="cpu")
    want = plain.encode(texts, batch_size=32, normalize_embeddings=True)
    got, stats = onnx_embedder.embed_with_stats(texts, counts, batch_tokens=4096)
    assert got.dtype == np.float32 and got.shape == want.shape
    cos = (got * want).sum(axis=1)
    assert float(cos.min()) >= 0.999, cos.min()
    assert onnx_embedder.precision == "fp32"
    assert onnx_embedder.count_tokens(texts[:8]) == counts[:8]
    assert stats.batches > 1  # several batches with different padding, all correct
    # Queries go through the same runner.
    np.testing.assert_allclose(onnx_embedder.embed_query(texts[0]), got[0], atol=1e-5)


@pytest.mark.slow
def test_export_happens_once(onnx_embedder, cache_dir, monkeypatch):
    from embedfleet.embedders.onnx import OnnxEmbedder

    model_file = onnx_embedder.directory / "model.onnx"
    mtime = model_file.stat().st_mtime_ns

    def no_second_export(*args, **kwargs):
        raise AssertionError("the model was exported again")

    monkeypatch.setattr(onnx_backend, "_export_into", no_second_export)
    again = OnnxEmbedder(config.embedder_spec(backend="onnx", device="cpu", cache_dir=cache_dir))
    assert again.directory == onnx_embedder.directory
    assert model_file.stat().st_mtime_ns == mtime
    manifest = json.loads((again.directory / onnx_backend.MANIFEST).read_text())
    assert manifest["pooling"] == ["mean"] and manifest["normalize"] is True
    assert manifest["verified_min_cosine"] >= onnx_backend.EXPORT_MIN_COSINE
    # Keyed by the model: the directory name carries the model's content hash.
    assert again.directory.name.startswith("minilm-")


@pytest.mark.slow
def test_int8_is_opt_in_and_reports_its_cosine(onnx_embedder, cache_dir, real_texts, caplog):
    from embedfleet.embedders.onnx import OnnxEmbedder

    texts, counts = real_texts
    spec = config.embedder_spec(backend="onnx", device="cpu", cache_dir=cache_dir, quantize="int8")
    int8 = OnnxEmbedder(spec)
    assert int8.precision == "int8"
    assert (int8.directory / "model.int8.onnx").is_file()
    assert "cosine to fp32" in caplog.text
    report = json.loads((int8.directory / onnx_backend.INT8_REPORT).read_text())  # stored beside the export
    assert report == int8.quantization
    assert 0.9 < report["min_cosine"] <= report["mean_cosine"] < 1.0
    # Retrieval too: each sample text as a query, its 10 nearest under int8 against fp32's.
    assert report["samples"] == onnx_backend.INT8_SAMPLES
    assert 0.5 < report["top10_overlap"] <= 1.0
    full, _ = onnx_embedder.embed_with_stats(texts, counts)
    small, _ = int8.embed_with_stats(texts, counts)
    assert float((full * small).sum(axis=1).mean()) > 0.9
    # The default stays fp32.
    assert config.embedder_spec(backend="onnx").quantize is None


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    from embedfleet.embedders.onnx import OnnxEmbedder

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(BackendUnavailableError) as info:
        OnnxEmbedder(config.embedder_spec(backend="onnx"))
    assert info.value.extra == "onnx"
    assert "embedfleet[onnx]" in str(info.value)


def test_registry_maps_onnx_to_the_backend():
    from embedfleet.embedders.onnx import OnnxEmbedder
    from embedfleet.embedders.registry import backend_factory

    assert backend_factory("onnx") is OnnxEmbedder


def test_numpy_pooling_matches_sentence_transformers_definitions():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    mean = onnx_backend._pool(hidden, mask, ["mean"])
    np.testing.assert_allclose(mean, [[1, 2], [8, 9]])
    np.testing.assert_allclose(onnx_backend._pool(hidden, mask, ["cls"]), [[0, 1], [6, 7]])
    np.testing.assert_allclose(onnx_backend._pool(hidden, mask, ["max"]), [[2, 3], [10, 11]])
    sqrt = onnx_backend._pool(hidden, mask, ["mean_sqrt_len_tokens"])
    np.testing.assert_allclose(sqrt, [[2 / np.sqrt(2), 4 / np.sqrt(2)], [24 / np.sqrt(3), 27 / np.sqrt(3)]], rtol=1e-6)
    both = onnx_backend._pool(hidden, mask, ["cls", "mean"])
    assert both.shape == (2, 4)


_RACE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from embedfleet.embedders import onnx

    def slow_fake_export(out, model_path, *, max_seq_length):
        # Stands in for the real export (which takes ~20 s): slow enough for the race.
        print("EXPORTING", flush=True)
        time.sleep(2)
        (Path(out) / "model.onnx").write_bytes(b"fake")
        (Path(out) / onnx.MANIFEST).write_text("{}")

    onnx._export_into = slow_fake_export
    print("DIR", onnx.export_model("minilm", sys.argv[1], sys.argv[2], max_seq_length=256), flush=True)
    """
)


def test_two_processes_exporting_at_once_export_once(tmp_path):
    """The file lock + atomic rename: one process exports, the other waits and reuses it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, str(model_dir), str(cache_dir)], stdout=subprocess.PIPE,
                         text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum(o.count("EXPORTING") for o in outputs) == 1
    dirs = {line for o in outputs for line in o.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1
    exported = list((cache_dir / "onnx").iterdir())
    # One finished export, its lock file, and no temporary directory left behind.
    assert sorted(p.name.endswith(".lock") for p in exported) == [False, True]
    assert not [p for p in exported if ".tmp-" in p.name]
