"""The ONNX Runtime backend (``--backend onnx``, ``pip install 'embedfleet[onnx]'``).

The sentence-transformers model's transformer is exported once with ``torch.onnx`` (the
TorchScript exporter: the dynamo exporter needs onnxscript, which the extra does not pull in),
together with its fast tokenizer, and cached under ``EmbedderSpec.cache_dir`` (the data dir's
``models/`` folder)::

    <cache_dir>/onnx/<model name>-<key>/
        model.onnx               the transformer: token ids -> last hidden state, fp32
        tokenizer.json           the tokenizer sentence-transformers uses for this model
        embedfleet-onnx.json     pooling, normalisation, input names, how it was verified
        model.int8.onnx          only after a --quantize int8 run; with model.int8.json

Why by hand: sentence-transformers' own ``backend="onnx"`` needs optimum-onnx, and every
release of it (0.1.0 and before) caps transformers below 4.58 and does not import beside
transformers 5 (``get_parameter_dtype`` is gone), which sentence-transformers 6 requires.

``key`` is a hash of the model directory's path and its files' names, sizes and mtimes, so a
changed model is exported again and two models never share an export
(:mod:`embedfleet.embedders.exports`, shared with the openvino backend). Pooling (the model's
``Pooling`` module: mean, cls, max, mean_sqrt_len_tokens) and normalisation run in numpy,
exactly as sentence-transformers does them. An export is verified against the torch model
before it is kept.

Two worker processes may load the model at once: the export runs under a file lock, into a
temporary directory that is renamed into place, so nobody ever reads a half-written model and
the export happens once.

``quantize="int8"`` (``--quantize int8``) is opt-in only: ONNX Runtime dynamic int8
quantization is ~1.7x faster on CPU but its vectors are only ~0.94 cosine to fp32 for
MiniLM. The cosine to fp32 is measured once on sample texts when the quantized model is
made, stored in ``model.int8.json`` and logged (WARNING) by every process that loads it.

The backend runs fp32 (``precision`` auto/fp32; bf16/fp16 are refused by ``embedder_spec``),
on the CPU or CUDA execution provider (``device``; auto picks CUDA when onnxruntime offers it).
On CUDA the batch budget is the configured one (no free-memory probe without torch) and an
out-of-memory error halves it like the torch backend.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from embedfleet.config import EmbedderSpec, resolve_model_path
from embedfleet.embedders import exports
from embedfleet.embedders.base import Embedder
from embedfleet.embedders.exports import cosines as _cosines
from embedfleet.embedders.exports import sample_texts, top_k_overlap
from embedfleet.errors import BackendUnavailableError, ConfigError, EmbeddingError

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_POOLING",
    "OnnxEmbedder",
    "export_model",
    "find_export",
    "model_key",
    "quantize_model",
]

# Bump when the export's layout or logic changes: old exports are then not reused.
EXPORT_FORMAT = 1
OPSET = 17
MANIFEST = "embedfleet-onnx.json"
INT8_REPORT = "model.int8.json"
# Help-topic texts the int8 report is measured on (top-10 overlap needs more than a handful).
INT8_SAMPLES = 64
SUPPORTED_POOLING = ("cls", "max", "mean", "mean_sqrt_len_tokens")
# An export whose vectors differ more than this from torch's is refused, not cached.
EXPORT_MIN_COSINE = 0.9999


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError("the onnx backend", "onnx", str(exc)) from exc
    return onnxruntime


def model_key(model_path: str) -> str:
    """The cache key of ``model_path``'s ONNX export (:func:`embedfleet.embedders.exports.model_key`)."""
    return exports.model_key(model_path, kind="onnx", version=EXPORT_FORMAT)


def export_dir(model_name: str, model_path: str, cache_dir: str | None) -> Path:
    return exports.export_dir(model_name, model_path, cache_dir, kind="onnx", version=EXPORT_FORMAT)


# --------------------------------------------------------------------------- export


def _pooling_modes(st_model) -> tuple[list[str], bool]:
    """(pooling modes in sentence-transformers' order, whether a Normalize module follows)."""
    modules = list(st_model)
    kinds = [type(m).__name__ for m in modules]
    if len(modules) < 2 or kinds[1] != "Pooling":
        raise EmbeddingError(f"the onnx backend needs a Transformer + Pooling model, this one is {kinds}")
    extra = [k for k in kinds[2:] if k != "Normalize"]
    if extra:
        raise EmbeddingError(f"the onnx backend cannot run modules {extra} after pooling; use sentence-transformers")
    pooling = modules[1]
    mode = getattr(pooling, "pooling_mode", None)
    if mode is None:  # sentence-transformers < 6: one boolean attribute per mode
        if getattr(pooling, "pooling_mode_weightedmean_tokens", False) or getattr(pooling, "pooling_mode_lasttoken", False):
            raise EmbeddingError(f"the onnx backend supports pooling {SUPPORTED_POOLING} only")
        mode = [m for m in SUPPORTED_POOLING if getattr(pooling, f"pooling_mode_{m}_tokens", False)
                or getattr(pooling, f"pooling_mode_{m}_token", False) or getattr(pooling, f"pooling_mode_{m}", False)]
    modes = [mode] if isinstance(mode, str) else list(mode)
    unsupported = [m for m in modes if m not in SUPPORTED_POOLING]
    if unsupported or not modes:
        raise EmbeddingError(f"the onnx backend supports pooling {SUPPORTED_POOLING}, not {unsupported or modes}")
    if getattr(pooling, "include_prompt", True) is False:
        raise EmbeddingError("the onnx backend does not support pooling with include_prompt=False")
    return modes, "Normalize" in kinds[2:]


def find_export(model_name: str, model_path: str, cache_dir: str | None) -> Path | None:
    """The finished export of a model, if some process made one; never exports."""
    target = export_dir(model_name, model_path, cache_dir)
    return target if (target / MANIFEST).is_file() else None


def export_model(model_name: str, model_path: str, cache_dir: str | None, *, max_seq_length: int) -> Path:
    """The export directory for ``model_path``, exporting it first if no process has yet.

    Safe to call from several processes at once: one exports, the others wait on the lock
    and reuse its result.
    """
    target = export_dir(model_name, model_path, cache_dir)
    return exports.publish(target, MANIFEST, lambda tmp: _export_into(tmp, model_path, max_seq_length=max_seq_length))


def _export_into(out: Path, model_path: str, *, max_seq_length: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from embedfleet.embedders.st_import import SentenceTransformer
    except ImportError as exc:
        raise BackendUnavailableError("exporting a model to ONNX", "onnx", str(exc)) from exc

    started = time.perf_counter()
    st_model = SentenceTransformer(model_path, device="cpu")
    st_model.eval()
    st_model.max_seq_length = min(st_model.max_seq_length, max_seq_length)
    modes, normalize = _pooling_modes(st_model)
    transformer = st_model[0].auto_model
    # Eager attention traces to plain MatMul/Softmax, which every ONNX Runtime provider runs
    # (and fuses); SDPA's tracing is version-dependent.
    if hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")
    tokenizer = st_model.tokenizer
    input_names = [n for n in tokenizer.model_input_names if n in ("input_ids", "attention_mask", "token_type_ids")]

    class _LastHiddenState(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(input_names, inputs))).last_hidden_state

    # Example inputs with padding, so the attention-mask path is traced (an unpadded example
    # could let the model skip its mask as a traced constant).
    example = tokenizer(["a short text", "a somewhat longer text to pad the first one against"],
                        padding=True, truncation=True, max_length=st_model.max_seq_length, return_tensors="pt")
    args = tuple(example[n] for n in input_names)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*input_names, "last_hidden_state"]}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter about the legacy exporter
        torch.onnx.export(
            _LastHiddenState(transformer), args, str(out / "model.onnx"),
            input_names=input_names, output_names=["last_hidden_state"], dynamic_axes=axes,
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "model_path": str(Path(model_path).resolve()),
        "input_names": input_names,
        "pooling": modes,
        "normalize": normalize,
        "max_seq_length": int(st_model.max_seq_length),
        "pad_token_id": int(tokenizer.pad_token_id or 0),
        "pad_token": str(tokenizer.pad_token or "[PAD]"),
        "dimensions": int((getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension)()),
        "torch": torch.__version__,
        "opset": OPSET,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))  # written before verify: _Runner reads it

    ort = _import_onnxruntime()
    runner = _Runner(out, "model.onnx", ort, providers=["CPUExecutionProvider"], threads=None)
    texts = sample_texts(16)
    got = runner.embed(texts)
    want = st_model.encode(texts, batch_size=len(texts), normalize_embeddings=normalize, convert_to_numpy=True,
                           show_progress_bar=False)
    cos = _cosines(got, want)
    if float(cos.min()) < EXPORT_MIN_COSINE:
        raise EmbeddingError(f"ONNX export of {model_path} disagrees with torch (min cosine {cos.min():.5f}); not cached")
    manifest["verified_min_cosine"] = float(cos.min())
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("exported %s to ONNX in %.1fs (min cosine to torch %.6f, pid %d)",
                model_path, time.perf_counter() - started, cos.min(), os.getpid())


# --------------------------------------------------------------------------- int8


def quantize_model(directory: Path, *, threads: int | None = None) -> dict[str, Any]:
    """Make ``model.int8.onnx`` next to ``model.onnx`` (once) and return its cosine report."""
    directory = Path(directory)
    report_path = directory / INT8_REPORT
    if report_path.is_file():
        return json.loads(report_path.read_text())
    with exports.lock(directory / "model.int8"):
        if report_path.is_file():
            return json.loads(report_path.read_text())
        ort = _import_onnxruntime()
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fd, tmp = tempfile.mkstemp(prefix=".model.int8.", suffix=".onnx", dir=directory)
        os.close(fd)
        try:
            # Per-channel weights keep more of each output channel's range than one scale per
            # tensor; it is the cheapest accuracy win dynamic quantization offers.
            quantize_dynamic(str(directory / "model.onnx"), tmp, weight_type=QuantType.QInt8, per_channel=True)
            exports.share(Path(tmp))
            os.replace(tmp, directory / "model.int8.onnx")
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        texts = sample_texts(INT8_SAMPLES)
        cpu = ["CPUExecutionProvider"]
        full = _Runner(directory, "model.onnx", ort, providers=cpu, threads=threads).embed(texts)
        small = _Runner(directory, "model.int8.onnx", ort, providers=cpu, threads=threads).embed(texts)
        cos = _cosines(small, full)
        report = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "samples": len(texts),
                  "top10_overlap": top_k_overlap(small, full, k=10)}
        exports.save_report(report, directory, report_path)
        return report


# --------------------------------------------------------------------------- running


class _Runner:
    """An ONNX Runtime session plus the tokenizer and pooling of one export."""

    def __init__(self, directory: Path, filename: str, ort, *, providers: list[str], threads: int | None):
        from tokenizers import Tokenizer

        self.manifest = json.loads((directory / MANIFEST).read_text())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers are not ours to fix
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(directory / filename), sess_options=options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=int(self.manifest["max_seq_length"]))
        tokenizer.enable_padding(pad_id=int(self.manifest["pad_token_id"]), pad_token=self.manifest["pad_token"])
        self.tokenizer = tokenizer
        self.modes = list(self.manifest["pooling"])
        self.normalize = bool(self.manifest["normalize"])

    def embed(self, texts: list[str], *, normalize: bool | None = None) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.asarray([e.type_ids for e in encodings], dtype=np.int64)
        hidden = self.session.run(["last_hidden_state"], {k: feeds[k] for k in self.input_names})[0]
        vectors = _pool(hidden.astype(np.float32, copy=False), mask, self.modes)
        if self.normalize if normalize is None else (normalize or self.normalize):
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors


def _pool(hidden: np.ndarray, mask: np.ndarray, modes: list[str]) -> np.ndarray:
    """sentence-transformers' Pooling, in numpy (modes concatenated in the given order)."""
    m = mask[..., None].astype(np.float32)
    out = []
    mean_sum = counts = None
    for mode in modes:
        if mode == "cls":
            out.append(hidden[np.arange(len(hidden)), mask.argmax(axis=1)])
        elif mode == "max":
            out.append(np.where(m > 0, hidden, -np.inf).max(axis=1))
        else:  # mean, mean_sqrt_len_tokens
            if mean_sum is None:
                mean_sum = (hidden * m).sum(axis=1)
                counts = np.maximum(m.sum(axis=1), 1e-9)
            out.append(mean_sum / (counts if mode == "mean" else np.sqrt(counts)))
    return np.concatenate(out, axis=1).astype(np.float32, copy=False) if len(out) > 1 else out[0].astype(np.float32)


def _providers(ort, device: str) -> tuple[list[str], str]:
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                "the onnx backend on CUDA", "onnx", "this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu"
            )
        index = device.partition(":")[2] or "0"
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"], device
    return ["CPUExecutionProvider"], "cpu"


class OnnxEmbedder(Embedder):
    #: What loading a model imports, for warm workers (embedfleet.embedders.registry.backend_modules).
    warm_modules = ("onnxruntime", "tokenizers")

    def __init__(self, spec: EmbedderSpec):
        super().__init__(spec)
        ort = _import_onnxruntime()
        from embedfleet.embedders.hardware import tune_allocator

        tune_allocator()  # ONNX Runtime's CPU arena sits on malloc too
        if spec.precision not in ("auto", "fp32"):
            raise ConfigError(f"the onnx backend runs fp32 (or --quantize int8), not {spec.precision}")
        path = resolve_model_path(spec.model.path)
        providers, self.device = _providers(ort, spec.device)
        directory = export_model(spec.model.name, path, spec.cache_dir, max_seq_length=spec.model.max_seq_length)
        filename = "model.onnx"
        self.precision = "fp32"
        self.quantization: dict[str, Any] | None = None
        if spec.quantize == "int8":
            self.quantization = quantize_model(directory, threads=spec.threads)
            filename, self.precision = "model.int8.onnx", "int8"
            logger.warning(
                "%s: int8-quantized ONNX model; cosine to fp32 on %d sample texts: mean %.4f, min %.4f "
                "(fp32 is the default for a reason)",
                spec.model.name, self.quantization["samples"], self.quantization["mean_cosine"],
                self.quantization["min_cosine"],
            )
        try:
            self._runner = _Runner(directory, filename, ort, providers=providers, threads=spec.threads)
        except Exception as exc:
            raise EmbeddingError(f"cannot load the ONNX model {directory / filename}: {exc}") from exc
        dimensions = int(self._runner.manifest["dimensions"])
        if dimensions != spec.model.dimensions:
            raise EmbeddingError(
                f"model {spec.model.name!r} at {path} makes {dimensions}-dimensional vectors; config says {spec.model.dimensions}"
            )
        self.directory = directory
        self.memory_bytes = (directory / filename).stat().st_size
        logger.info("loaded %s (onnx, %s) on %s from %s (pid %d)", spec.model.name, self.precision, self.device,
                    directory, os.getpid())

    def default_batch_tokens(self) -> int:
        # Measured on CPU, fp32 and int8 alike (see embedfleet.embedders.base).
        return 8192 if self.device.startswith("cuda") else 2048

    def _is_oom(self, exc: BaseException) -> bool:
        # onnxruntime raises its own RuntimeException type; only the message says "memory".
        text = str(exc).lower()
        return self.device.startswith("cuda") and ("failed to allocate memory" in text or "out of memory" in text)

    def _encode(self, texts: list[str]) -> np.ndarray:
        try:
            return self._runner.embed(texts, normalize=self.spec.model.normalize)
        except Exception as exc:
            if self._is_oom(exc):
                raise
            raise EmbeddingError(f"{self.name}: encoding a batch of {len(texts)} texts failed: {exc}") from exc

    def count_tokens(self, texts):
        # The runner's tokenizer pads and truncates: count real positions, minus [CLS]/[SEP].
        tokenizer = self._runner.tokenizer
        special = tokenizer.num_special_tokens_to_add(False)
        return [max(0, sum(e.attention_mask) - special) for e in tokenizer.encode_batch(list(texts))]
