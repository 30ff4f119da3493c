"""What the exporting backends (onnx, openvino) share: the cache key, the once-only export, quality numbers.

An export lives under ``EmbedderSpec.cache_dir`` (the data dir's ``models/`` folder) in
``<cache_dir>/<kind>/<model name>-<key>/``. ``key`` hashes the model directory's path and
its files' names, sizes and mtimes, so a changed model is exported again and two models never
share an export. :func:`publish` makes an export at most once across processes: under a file
lock, into a temporary directory renamed into place, so nobody reads a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["cosines", "export_dir", "lock", "model_key", "publish", "sample_texts", "share", "top_k_overlap"]

# Files other tools put next to a model (sentence-transformers' own backend exports included):
# not part of the model, so they must not change its key.
_NOT_MODEL = (".", "onnx/", "openvino/")


def model_key(model_path: str, *, kind: str, version: int) -> str:
    """Hash of a model directory's absolute path and its files' names, sizes and mtimes (hex).

    Stat, not content: hashing the weights cost ~0.1 s per load, a large share of a
    one-query ``embedfleet search``; replacing a model file changes its size or mtime.
    ``kind`` and ``version`` (the export layout's) keep different exporters' keys apart.
    """
    root = Path(model_path).resolve()
    digest = hashlib.sha256(f"embedfleet-{kind}:{version}:{root}".encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(_NOT_MODEL) or "/." in rel or rel.endswith(".onnx"):
            continue
        st = path.stat()
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "embedfleet", "models")


def export_dir(model_name: str, model_path: str, cache_dir: str | None, *, kind: str, version: int) -> Path:
    root = Path(cache_dir or _default_cache_dir()) / kind
    return root / f"{model_name}-{model_key(model_path, kind=kind, version=version)[:16]}"


def lock(target: Path):
    # filelock: a dependency of huggingface_hub, hence of sentence-transformers
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target) + ".lock")


def share(path: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; an export is shared like any cache file."""
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        path.chmod(0o777 & ~umask)
        for child in path.rglob("*"):
            child.chmod((0o777 if child.is_dir() else 0o666) & ~umask)
    else:
        path.chmod(0o666 & ~umask)


def publish(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``target``, made by ``build(tmp)`` first if no process has made it yet (``target/marker`` exists once it has).

    Safe to call from several processes at once: one builds, the others wait on the lock and
    reuse its result.
    """
    if (target / marker).is_file():
        return target
    with lock(target):
        if (target / marker).is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            share(tmp)
            if target.exists():  # a leftover without its marker: never complete, safe to replace
                shutil.rmtree(target)
            os.rename(tmp, target)  # atomic: readers see all of it or none
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


_FALLBACK_SAMPLES = [
    "Rotate log files daily with logrotate and keep a week of compressed history.",
    "The restore command takes a snapshot id and rebuilds the database from object storage.",
    "How do I reset my password?",
    "Python lists are mutable sequences, typically used to store collections of homogeneous items.",
    "A context manager is an object that defines the runtime context to be established when executing a with statement.",
    "Exceptions are raised when an error is detected; they can be handled by the surrounding code block.",
    "The quick brown fox jumps over the lazy dog.",
    "  Leading and trailing whitespace, tabs\tand\nnewlines.  ",
]


def save_report(report: dict, directory: Path, report_path: Path) -> None:
    """Write an int8 report next to its export: whole or not at all, readable by every user of the cache."""
    import json

    fd, name = tempfile.mkstemp(prefix=".int8-report.", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f)
    share(Path(name))
    os.replace(name, report_path)


def sample_texts(n: int = 32) -> list[str]:
    """Real text of the lengths the pipeline embeds: Python's help topics (stdlib), else a few sentences."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return list(_FALLBACK_SAMPLES)
    texts = list(_FALLBACK_SAMPLES)
    for name in sorted(topics)[: max(0, n - len(texts))]:
        body = topics[name]
        # Vary the lengths: short and long texts share batches, so padding is exercised too.
        texts.append(body[: 200 + (len(texts) * 97) % 1000])
    return texts[:n]


def top_k_overlap(vectors: np.ndarray, reference: np.ndarray, *, k: int) -> float:
    """Taking each text as a query over all of them: the share of the reference's ``k`` nearest
    that ``vectors`` also rank in their ``k`` nearest, averaged (retrieval, not just cosine)."""
    a = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    b = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    k = min(k, len(a))
    got = np.argsort(-(a @ a.T), axis=1)[:, :k]
    want = np.argsort(-(b @ b.T), axis=1)[:, :k]
    return float(np.mean([len(set(g) & set(w)) / k for g, w in zip(got, want)]))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)
