"""The sentence-transformers (torch) backend: cpu or cuda, fp32 / bf16 / fp16.

Precision and device are resolved on the worker (:mod:`embedfleet.embedders.hardware`).
On CUDA the batch budget grows with the GPU's free memory and a CUDA out-of-memory error
halves it and retries (shared logic in :mod:`embedfleet.embedders.base`).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from embedfleet.config import EmbedderSpec, resolve_model_path
from embedfleet.embedders.base import Embedder
from embedfleet.embedders.hardware import (
    activation_bytes_per_token,
    bound_kernel_caches,
    gpu_batch_tokens,
    resolve_device,
    resolve_precision,
    tune_allocator,
)
from embedfleet.errors import BackendUnavailableError, EmbeddingError

logger = logging.getLogger(__name__)

__all__ = ["SentenceTransformerEmbedder"]


class SentenceTransformerEmbedder(Embedder):
    #: What loading a model imports, for warm workers (embedfleet.embedders.registry.backend_modules).
    warm_modules = ("torch", "transformers", "embedfleet.embedders.st_import")

    def __init__(self, spec: EmbedderSpec):
        super().__init__(spec)
        # The model comes from a local path; never let a library reach for a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        bound_kernel_caches()
        try:
            import torch
            import transformers
            from embedfleet.embedders.st_import import SentenceTransformer
        except ImportError as exc:
            raise BackendUnavailableError("the sentence-transformers backend", "sentence-transformers", str(exc)) from exc

        transformers.logging.disable_progress_bar()  # a worker's log is no place for a progress bar
        tune_allocator()
        if spec.threads:
            # Dask's nanny starts workers with OMP_NUM_THREADS=1; the embedder is the one
            # place that should use every core the worker was given.
            torch.set_num_threads(int(spec.threads))
        self.device = resolve_device(spec.device)
        self.precision = resolve_precision(spec.precision, self.device)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        path = resolve_model_path(spec.model.path)
        try:
            self._model = SentenceTransformer(path, device=self.device, model_kwargs={"torch_dtype": dtype})
        except Exception as exc:
            raise EmbeddingError(f"cannot load model {spec.model.name!r} from {path}: {exc}") from exc
        self._model.eval()
        self._model.max_seq_length = min(self._model.max_seq_length, spec.model.max_seq_length)
        dimension_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        actual = dimension_of()
        if actual != spec.model.dimensions:
            raise EmbeddingError(
                f"model {spec.model.name!r} at {path} makes {actual}-dimensional vectors; config says {spec.model.dimensions}"
            )
        self._torch = torch
        self.memory_bytes = sum(p.numel() * p.element_size() for p in self._model.parameters())
        self._tokenizer = self._model.tokenizer
        self._bytes_per_token = self._activation_bytes_per_token(dtype.itemsize)
        logger.info("loaded %s on %s at %s (pid %d)", spec.model.name, self.device, self.precision, os.getpid())

    def _activation_bytes_per_token(self, element_bytes: int) -> int:
        config = getattr(self._model[0], "auto_model", None)
        config = getattr(config, "config", None)
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        if not hidden:
            return 0  # unknown architecture: keep the configured budget on GPU
        return activation_bytes_per_token(
            hidden_size=hidden,
            intermediate_size=int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden),
            num_heads=int(getattr(config, "num_attention_heads", 1) or 1),
            max_seq_length=int(self._model.max_seq_length),
            element_bytes=element_bytes,
        )

    def default_batch_tokens(self) -> int:
        # Measured on CPU (see embedfleet.embedders.base); on a GPU the budget then grows with
        # free memory (_device_batch_tokens).
        if self.device.startswith("cuda"):
            return 8192
        return 2048 if self.precision == "fp32" else 4096

    @classmethod
    def oom_error_types(cls) -> tuple[type[BaseException], ...]:
        import torch

        return (torch.OutOfMemoryError, MemoryError)

    def _device_batch_tokens(self, requested: int) -> int:
        if not self.device.startswith("cuda"):
            return requested
        free, _total = self._torch.cuda.mem_get_info(self._torch.device(self.device))
        return gpu_batch_tokens(requested, free_bytes=free, bytes_per_token=self._bytes_per_token)

    def _after_oom(self) -> None:
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    def close(self) -> None:
        # A task on another thread may still be using the model: drop nothing it needs; the
        # cache's reference is gone, so the model is freed when the last user lets go.
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    def _encode(self, texts: list[str]) -> np.ndarray:
        threads = self.spec.threads
        if threads and self._torch.get_num_threads() != threads:
            # The resident model may have been loaded by a job whose spec named no threads
            # (Dask's nanny starts workers at OMP_NUM_THREADS=1): follow the current job's.
            self._torch.set_num_threads(int(threads))
        try:
            with self._torch.inference_mode():
                vectors = self._model.encode(
                    texts,
                    batch_size=len(texts),
                    normalize_embeddings=self.spec.model.normalize,
                    convert_to_numpy=False,
                    convert_to_tensor=True,
                    show_progress_bar=False,
                )
        except self.oom_error_types():
            raise  # the batching layer halves the budget and retries
        except Exception as exc:
            raise EmbeddingError(f"{self.name}: encoding a batch of {len(texts)} texts failed: {exc}") from exc
        return vectors.float().cpu().numpy()

    def count_tokens(self, texts):
        encoded = self._tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]
