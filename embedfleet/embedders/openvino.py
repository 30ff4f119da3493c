"""The OpenVINO backend (``--backend openvino``, ``pip install 'embedfleet[openvino]'``), on CPU.

sentence-transformers' own ``backend="openvino"`` (optimum-intel) does the work: the model is
exported once with it, saved with ``save_pretrained`` and cached under
``EmbedderSpec.cache_dir`` (the data dir's ``models/`` folder); every later load reads the
saved IR and never exports again::

    <cache_dir>/openvino/<model name>-<key>/
        modules.json, tokenizer ...           the sentence-transformers model as saved
        openvino/openvino_model.xml|.bin      the transformer as OpenVINO IR, fp32
        embedfleet-openvino.json              how it was made and verified against torch
        openvino/openvino_model_qint8_quantized.xml|.bin    only after a --quantize int8 run,
        openvino_model_qint8_quantized.json                 with its quality report

The key and the once-only export under a file lock are :mod:`embedfleet.embedders.exports`'.
An export is verified against the torch model (min cosine :data:`EXPORT_MIN_COSINE`) before
it is kept.

``quantize="int8"`` is static post-training quantization (NNCF, through optimum-intel's
``OVQuantizer``, which is what sentence-transformers' ``export_static_quantized_openvino_model``
calls): activations are calibrated on sample texts. That helper only calibrates on a dataset
from the Hugging Face hub, so :func:`quantize_model` calls the quantizer itself with texts it is
given (``benchmarks/backends.py`` passes a sample of the corpus's own chunks) or, from a worker,
Python's help topics. The first quantization of a model is the one cached. Its report (mean
and min cosine to fp32 and top-10 overlap, on the onnx report's 64 help-topic texts) has the
shape of the onnx backend's and is logged by every process that loads the int8 model.

optimum-intel 2.x needs transformers < 5.6 (see pyproject.toml's ``openvino`` extra), under
which the onnx backend's own export does not trace: the two extras need separate environments.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedfleet.config import EmbedderSpec, resolve_model_path
from embedfleet.embedders import exports
from embedfleet.embedders.base import Embedder
from embedfleet.errors import BackendUnavailableError, ConfigError, EmbeddingError

logger = logging.getLogger(__name__)

__all__ = ["OpenVinoEmbedder", "export_model", "find_export", "quantize_model"]

# Bump when the export's layout or logic changes: old exports are then not reused.
EXPORT_FORMAT = 1
MANIFEST = "embedfleet-openvino.json"
FP32_FILE = "openvino/openvino_model.xml"
# sentence-transformers' name for a static int8 export (its file_suffix "qint8_quantized").
INT8_FILE = "openvino/openvino_model_qint8_quantized.xml"
INT8_REPORT = "openvino_model_qint8_quantized.json"
# optimum-intel's default calibration size; help topics give fewer when no texts are passed.
CALIBRATION_SAMPLES = 300
INT8_SAMPLES = 64
EXPORT_MIN_COSINE = 0.9999


def _sentence_transformer_class():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import optimum.intel.openvino  # noqa: F401  (sentence-transformers imports it lazily, with a vaguer error)
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise BackendUnavailableError("the openvino backend", "openvino", str(exc)) from exc
    return SentenceTransformer


def export_dir(model_name: str, model_path: str, cache_dir: str | None) -> Path:
    return exports.export_dir(model_name, model_path, cache_dir, kind="openvino", version=EXPORT_FORMAT)


def find_export(model_name: str, model_path: str, cache_dir: str | None) -> Path | None:
    """The finished export of a model, if some process made one; never exports."""
    target = export_dir(model_name, model_path, cache_dir)
    return target if (target / MANIFEST).is_file() else None


def load(directory: Path, filename: str, *, threads: int | None = None, max_seq_length: int | None = None):
    """The saved export in ``directory`` as a SentenceTransformer running ``filename`` on OpenVINO."""
    SentenceTransformer = _sentence_transformer_class()
    ov_config = {"INFERENCE_NUM_THREADS": str(int(threads))} if threads else {}
    model = SentenceTransformer(str(directory), backend="openvino", device="cpu",
                                model_kwargs={"file_name": filename, "ov_config": ov_config})
    if max_seq_length:
        model.max_seq_length = min(model.max_seq_length, max_seq_length)
    return model


def _encode(model, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
    vectors = model.encode(list(texts), batch_size=len(texts), normalize_embeddings=normalize,
                           convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def export_model(model_name: str, model_path: str, cache_dir: str | None) -> Path:
    """The export directory for ``model_path``, exporting it first if no process has yet."""
    target = export_dir(model_name, model_path, cache_dir)
    return exports.publish(target, MANIFEST, lambda tmp: _export_into(tmp, model_path))


def _export_into(out: Path, model_path: str) -> None:
    SentenceTransformer = _sentence_transformer_class()
    import openvino

    started = time.perf_counter()
    # backend="openvino" on a model without an IR exports it (optimum-intel); saving writes
    # the IR under openvino/ next to the model's own files, which later loads read as they are.
    # Its "save the exported model" advice is what this function does next; not for the log.
    advice = logging.getLogger("sentence_transformers.backend.utils")
    level = advice.level
    advice.setLevel(logging.ERROR)
    try:
        exported = SentenceTransformer(model_path, backend="openvino", device="cpu")
    finally:
        advice.setLevel(level)
    exported.save_pretrained(str(out))
    texts = exports.sample_texts(16)
    got = _encode(load(out, FP32_FILE), texts, normalize=False)
    want = _encode(SentenceTransformer(model_path, device="cpu"), texts, normalize=False)
    cos = exports.cosines(got, want)
    if float(cos.min()) < EXPORT_MIN_COSINE:
        raise EmbeddingError(f"OpenVINO export of {model_path} disagrees with torch (min cosine {cos.min():.5f}); "
                             "not cached")
    manifest = {"format": EXPORT_FORMAT, "model_path": str(Path(model_path).resolve()),
                "verified_min_cosine": float(cos.min()), "openvino": openvino.__version__}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("exported %s to OpenVINO in %.1fs (min cosine to torch %.6f, pid %d)",
                model_path, time.perf_counter() - started, cos.min(), os.getpid())


def quantize_model(directory: Path, *, calibration_texts: Sequence[str] | None = None,
                   threads: int | None = None) -> dict[str, Any]:
    """Make the static int8 model next to the fp32 one (once) and return its quality report.

    ``calibration_texts``: what to calibrate the activations' ranges on (at most
    :data:`CALIBRATION_SAMPLES` of them); none: Python's help topics.
    """
    directory = Path(directory)
    report_path = directory / INT8_REPORT
    if report_path.is_file():
        return json.loads(report_path.read_text())
    with exports.lock(directory / "int8"):
        if report_path.is_file():
            return json.loads(report_path.read_text())
        import nncf
        from optimum.intel.openvino import OVConfig, OVQuantizationConfig, OVQuantizer

        fp32 = load(directory, FP32_FILE, threads=threads)
        report_texts = exports.sample_texts(INT8_SAMPLES)
        # Before quantizing: the quantizer changes fp32's model in place.
        full = _encode(fp32, report_texts, normalize=False)
        texts = list(calibration_texts or exports.sample_texts(CALIBRATION_SAMPLES))[:CALIBRATION_SAMPLES]
        # One unpadded text per sample: the ranges seen are those of real tokens, at the
        # lengths the pipeline embeds.
        samples = [dict(fp32.tokenizer(t, truncation=True, max_length=fp32.max_seq_length, return_tensors="np"))
                   for t in texts]
        tmp = Path(tempfile.mkdtemp(prefix=".int8.tmp-", dir=directory))
        try:
            OVQuantizer.from_pretrained(fp32.transformers_model).quantize(
                calibration_dataset=nncf.Dataset(samples), save_directory=str(tmp),
                ov_config=OVConfig(quantization_config=OVQuantizationConfig(num_samples=len(samples))),
            )
            exports.share(tmp)
            # The weights first: an .xml in place means its .bin is complete.
            for suffix in (".bin", ".xml"):
                os.replace(tmp / "openvino" / f"openvino_model{suffix}", directory / INT8_FILE.replace(".xml", suffix))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        small = _encode(load(directory, INT8_FILE, threads=threads), report_texts, normalize=False)
        cos = exports.cosines(small, full)
        report = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "samples": len(report_texts),
                  "top10_overlap": exports.top_k_overlap(small, full, k=10), "calibration_texts": len(samples),
                  "calibration": "given texts" if calibration_texts else "help topics"}
        exports.save_report(report, directory, report_path)
        return report


class OpenVinoEmbedder(Embedder):
    #: What loading a model imports, for warm workers (embedfleet.embedders.registry.backend_modules).
    warm_modules = ("openvino", "sentence_transformers", "optimum.intel.openvino")

    def __init__(self, spec: EmbedderSpec):
        super().__init__(spec)
        if spec.precision not in ("auto", "fp32"):
            raise ConfigError(f"the openvino backend runs fp32 (or --quantize int8), not {spec.precision}")
        if spec.device not in ("auto", "cpu"):
            raise ConfigError(f"the openvino backend runs on the CPU, not {spec.device}")
        _sentence_transformer_class()  # the missing-extra error before any export work
        from embedfleet.embedders.hardware import tune_allocator

        tune_allocator()
        path = resolve_model_path(spec.model.path)
        self.device, self.precision = "cpu", "fp32"
        directory = export_model(spec.model.name, path, spec.cache_dir)
        filename = FP32_FILE
        self.quantization: dict[str, Any] | None = None
        if spec.quantize == "int8":
            self.quantization = quantize_model(directory, threads=spec.threads)
            filename, self.precision = INT8_FILE, "int8"
            logger.warning(
                "%s: static int8 OpenVINO model; cosine to fp32 on %d sample texts: mean %.4f, min %.4f "
                "(fp32 is the default for a reason)",
                spec.model.name, self.quantization["samples"], self.quantization["mean_cosine"],
                self.quantization["min_cosine"],
            )
        try:
            self._model = load(directory, filename, threads=spec.threads, max_seq_length=spec.model.max_seq_length)
        except Exception as exc:
            raise EmbeddingError(f"cannot load the OpenVINO model {directory / filename}: {exc}") from exc
        dimension_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        if dimension_of() != spec.model.dimensions:
            raise EmbeddingError(f"model {spec.model.name!r} at {path} makes {dimension_of()}-dimensional vectors; "
                                 f"config says {spec.model.dimensions}")
        self.directory = directory
        self.memory_bytes = (directory / filename).with_suffix(".bin").stat().st_size
        self._tokenizer = self._model.tokenizer
        logger.info("loaded %s (openvino, %s) from %s (pid %d)", spec.model.name, self.precision, directory, os.getpid())

    def default_batch_tokens(self) -> int:
        # The onnx backend's measured CPU budget (see embedfleet.embedders.base); not tuned for OpenVINO.
        return 2048

    def _encode(self, texts: list[str]) -> np.ndarray:
        try:
            return _encode(self._model, texts, normalize=self.spec.model.normalize)
        except Exception as exc:
            raise EmbeddingError(f"{self.name}: encoding a batch of {len(texts)} texts failed: {exc}") from exc

    def count_tokens(self, texts):
        encoded = self._tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]
