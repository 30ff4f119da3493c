"""The model's tokenizer as chunking uses it: loaded once, untruncated; the chunk budget; the
document tokenisation the window planner reads; which tokenizers need no re-encoding at clean cuts."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedfleet.config import ChunkSpec, resolve_model_path
from embedfleet.errors import ChunkingError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["load_tokenizer", "reserved_tokens", "validate_for_model"]


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_path: str) -> Tokenizer:
    """The model's fast tokenizer, loaded once per process, with truncation and padding off.

    ``model_path`` is the model's path as configured (``ModelSpec.path``): ``package:MODULE``
    or a directory, resolved here by :func:`embedfleet.config.resolve_model_path`, as the
    embedders resolve it. Chunk tasks are given that form rather than the driver's resolved
    directory, which need not exist on a worker whose Python lives elsewhere. The directory's
    ``tokenizer.json`` is read with :mod:`tokenizers`; without one, transformers' fast
    tokenizer for the directory is used. The file may ask for truncation/padding (MiniLM's
    truncates at 128): both are switched off, otherwise counts would silently stop at the
    truncation length.
    """
    from tokenizers import Tokenizer

    model_path = resolve_model_path(model_path)
    path = Path(model_path) / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(model_path, use_fast=True)
            tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        except Exception as exc:  # transformers raises many types for a missing/odd model dir
            raise ChunkingError(f"cannot load a fast tokenizer from {model_path}: {exc}") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _as_tokenizer(tokenizer: Any) -> Tokenizer:
    # Accept transformers' fast tokenizers too; never mutate a caller's object (another thread
    # may be encoding with it), copy it if it truncates or pads.
    inner = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(inner, "encode_batch"):
        raise ChunkingError(f"chunking needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    if inner.truncation is not None or inner.padding is not None:
        from tokenizers import Tokenizer

        inner = Tokenizer.from_str(inner.to_str())
        inner.no_truncation()
        inner.no_padding()
    return inner


def reserved_tokens(model_path: str, *, prefix: str = "") -> int:
    """Tokens the embedder adds to every chunk: special tokens plus the document prefix.

    The chunk budget is ``max_seq_length - reserved_tokens(...)``.
    """
    tokenizer = load_tokenizer(model_path)
    extra = len(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0
    return tokenizer.num_special_tokens_to_add(False) + extra


def validate_for_model(
    chunk_spec: ChunkSpec,
    max_tokens: int,
    *,
    model_name: str | None = None,
    max_seq_length: int | None = None,
) -> None:
    """Refuse a token chunk size the model cannot take whole.

    ``max_tokens`` is the chunk budget (the model's max sequence length less its reserved
    tokens). Word and character chunks are not refused: their windows shrink to fit.
    """
    if max_tokens < 1:
        raise ChunkingError(f"the model leaves no room for chunk text (max_tokens={max_tokens})")
    if chunk_spec.unit == "tokens" and chunk_spec.size > max_tokens:
        model = f"model {model_name!r}" if model_name else "the model"
        limit = f"max sequence length {max_seq_length}" if max_seq_length is not None else "its limit"
        reserved = (
            f", less {max_seq_length - max_tokens} special/prefix tokens"
            if max_seq_length is not None and max_seq_length != max_tokens
            else ""
        )
        raise ChunkingError(
            f"chunk size {chunk_spec.size} tokens is larger than the {max_tokens} tokens {model} can embed "
            f"({limit}{reserved}); it would silently truncate the tail of every full chunk. "
            f"Use a chunk size of at most {max_tokens} (embedfleet.chunk.size / --chunk-size)."
        )


class _DocTokens:
    """What the window planner needs from a document's own tokenisation."""

    __slots__ = ("arrays", "continues", "ends", "starts")

    def __init__(self, encoding: Any, length: int, *, words: bool):
        import numpy as np

        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        # Normalisers can emit non-monotonic offsets in corner cases; boundaries must never go
        # backwards, and never past the text.
        starts = np.minimum(np.maximum.accumulate(offsets[:, 0]), length) if len(offsets) else offsets[:, 0]
        ends = np.maximum.accumulate(offsets[:, 1]) if len(offsets) else offsets[:, 1]
        self.arrays = (starts, ends)  # for the windows' word alignment, without a loop per token
        self.starts: list[int] = starts.tolist()
        self.ends: list[int] | None = None
        self.continues: list[bool] | None = None
        if words and len(offsets):
            self.ends = ends.tolist()
            ids = np.array(encoding.word_ids, dtype=float)  # None (a token outside words) -> nan
            continues = np.zeros(len(ids), dtype=bool)
            continues[1:] = ids[1:] == ids[:-1]  # nan never equals: such tokens start a word
            self.continues = continues.tolist()


_CONTEXT_FREE: dict[int, tuple[Any, bool]] = {}


def _context_free(tokenizer: Tokenizer) -> bool:
    """Is tokenisation a concatenation over pre-tokenizer words (so clean cuts need no re-encode)?"""
    cached = _CONTEXT_FREE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    import json

    try:
        pipeline = json.loads(tokenizer.to_str())
        normalizer = pipeline.get("normalizer") or {}
        verdict = (
            normalizer.get("type", "BertNormalizer") == "BertNormalizer"
            and (pipeline.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
            and (pipeline.get("model") or {}).get("type") == "WordPiece"
        )
    except (ValueError, AttributeError):
        verdict = False
    if len(_CONTEXT_FREE) > 16:
        _CONTEXT_FREE.clear()
    _CONTEXT_FREE[id(tokenizer)] = (tokenizer, verdict)
    return verdict

