"""The OpenVINO backend: sentence-transformers' own backend="openvino", exported once, static int8 opt-in."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from embedfleet import config
from embedfleet.embedders import openvino as ov_backend
from embedfleet.errors import BackendUnavailableError, ConfigError
from tests.conftest import help_topic_chunks


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def real_texts():
    return help_topic_chunks(topics=20, limit=64)


@pytest.fixture(scope="module")
def ov_embedder(cache_dir):
    # Only here: the tests below need no OpenVINO, and run where the extra is not installed.
    pytest.importorskip("optimum.intel.openvino", exc_type=ImportError)
    return ov_backend.OpenVinoEmbedder(config.embedder_spec(backend="openvino", cache_dir=cache_dir))


@pytest.mark.slow
def test_openvino_matches_sentence_transformers(ov_embedder, real_texts):
    from sentence_transformers import SentenceTransformer

    texts, counts = real_texts
    plain = SentenceTransformer(config.resolve_model_path(ov_embedder.spec.model.path), device="cpu")
    want = plain.encode(texts, batch_size=32, normalize_embeddings=True)
    got, stats = ov_embedder.embed_with_stats(texts, counts, batch_tokens=4096)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert float((got * want).sum(axis=1).min()) >= 0.9999
    assert ov_embedder.precision == "fp32" and ov_embedder.device == "cpu"
    assert ov_embedder.count_tokens(texts[:8]) == counts[:8]
    assert stats.batches > 1
    np.testing.assert_allclose(ov_embedder.embed_query(texts[0]), got[0], atol=1e-5)


@pytest.mark.slow
def test_export_is_saved_and_loaded_not_redone(ov_embedder, cache_dir, monkeypatch):
    ir = ov_embedder.directory / ov_backend.FP32_FILE
    assert ir.is_file() and ir.with_suffix(".bin").is_file()
    mtime = ir.stat().st_mtime_ns

    def no_second_export(*args, **kwargs):
        raise AssertionError("the model was exported again")

    monkeypatch.setattr(ov_backend, "_export_into", no_second_export)
    again = ov_backend.OpenVinoEmbedder(config.embedder_spec(backend="openvino", cache_dir=cache_dir))
    assert again.directory == ov_embedder.directory and ir.stat().st_mtime_ns == mtime
    assert again.directory.parent.name == "openvino" and again.directory.name.startswith("minilm-")
    manifest = json.loads((again.directory / ov_backend.MANIFEST).read_text())
    assert manifest["verified_min_cosine"] >= ov_backend.EXPORT_MIN_COSINE
    assert ov_backend.find_export("minilm", config.resolve_model_path(again.spec.model.path), cache_dir) == again.directory


@pytest.mark.slow
def test_static_int8_calibrated_on_given_texts(ov_embedder, cache_dir, real_texts, caplog):
    texts, counts = real_texts
    report = ov_backend.quantize_model(ov_embedder.directory, calibration_texts=texts)
    assert report["calibration"] == "given texts" and report["calibration_texts"] == len(texts)
    assert report["samples"] == ov_backend.INT8_SAMPLES
    assert 0.9 < report["min_cosine"] <= report["mean_cosine"] < 1.0
    assert 0.5 < report["top10_overlap"] <= 1.0
    spec = config.embedder_spec(backend="openvino", cache_dir=cache_dir, quantize="int8")
    int8 = ov_backend.OpenVinoEmbedder(spec)  # reuses the quantized model: the report is the same one
    assert int8.precision == "int8" and int8.quantization == report
    assert (int8.directory / ov_backend.INT8_FILE).is_file()
    assert "cosine to fp32" in caplog.text
    assert json.loads((int8.directory / ov_backend.INT8_REPORT).read_text()) == report  # stored beside the export
    full, _ = ov_embedder.embed_with_stats(texts, counts)
    small, _ = int8.embed_with_stats(texts, counts)
    assert float((full * small).sum(axis=1).mean()) > 0.95
    assert int8.memory_bytes < ov_embedder.memory_bytes / 2  # int8 weights


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.intel.openvino", None)  # makes the import raise ImportError
    with pytest.raises(BackendUnavailableError) as info:
        ov_backend.OpenVinoEmbedder(config.embedder_spec(backend="openvino"))
    assert info.value.extra == "openvino" and "embedfleet[openvino]" in str(info.value)


def test_spec_rules():
    assert config.embedder_spec(backend="openvino", quantize="int8").quantize == "int8"
    with pytest.raises(ConfigError, match="fp32"):
        config.embedder_spec(backend="openvino", precision="bf16")
    with pytest.raises(ConfigError, match="CPU"):
        config.embedder_spec(backend="openvino", device="cuda")
    with pytest.raises(ConfigError, match="onnx or openvino"):
        config.embedder_spec(backend="sentence-transformers", quantize="int8")


def test_registry_and_warm_imports_know_it():
    from embedfleet.embedders.registry import backend_factory
    from embedfleet.embedders.registry import backend_modules

    assert backend_factory("openvino") is ov_backend.OpenVinoEmbedder
    assert "optimum.intel.openvino" in backend_modules("openvino")
