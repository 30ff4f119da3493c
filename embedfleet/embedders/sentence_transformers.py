"""The sentence-transformers (torch) backend: cpu or cuda, fp32 / bf16 / fp16."""

from __future__ import annotations

import logging
import os

import numpy as np

from embedfleet.config import EmbedderSpec, resolve_model_path
from embedfleet.embedders.base import Embedder
from embedfleet.embedders.hardware import resolve_device, resolve_precision
from embedfleet.errors import BackendUnavailableError, EmbeddingError

logger = logging.getLogger(__name__)

__all__ = ["SentenceTransformerEmbedder"]


class SentenceTransformerEmbedder(Embedder):
    def __init__(self, spec: EmbedderSpec):
        super().__init__(spec)
        # The model comes from a local path; never let a library reach for a hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            import transformers
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise BackendUnavailableError("the sentence-transformers backend", "sentence-transformers", str(exc)) from exc

        transformers.logging.disable_progress_bar()  # a worker's log is no place for a progress bar
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
        logger.info("loaded %s on %s at %s (pid %d)", spec.model.name, self.device, self.precision, os.getpid())

    def _encode(self, texts: list[str]) -> np.ndarray:
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
        except Exception as exc:
            raise EmbeddingError(f"{self.name}: encoding a batch of {len(texts)} texts failed: {exc}") from exc
        return vectors.float().cpu().numpy()

    def count_tokens(self, texts):
        encoded = self._tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]
