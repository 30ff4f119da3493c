"""What this process's hardware supports, for resolving ``precision: auto`` and ``device: auto``.

Resolved on the worker that loads the model (the client may have different hardware), and
reported back in each embed task's stats, so ``JobResult.precision`` is what actually ran.

Precision rules
---------------
* ``auto``: on CUDA, bf16 where the GPU supports it, else fp16; on CPU, bf16 where the CPU
  has AVX512-BF16 or AMX (native bf16 matmuls, ~2x fp32 for MiniLM on this project's test
  machine with cosine >= 0.995 to fp32), else fp32.
* ``fp16`` on CPU is refused (:class:`~embedfleet.errors.ConfigError`): CPUs without
  AVX512-FP16 emulate it, slower than fp32 for no gain. ``embedder_spec`` refuses
  ``--precision fp16 --device cpu`` on the client; with ``device: auto`` a worker without
  CUDA refuses it when it loads the model.
* ``bf16`` on a CPU without native bf16 runs (emulated), with a warning that it is slow.
"""

from __future__ import annotations

import functools
import logging
import os

from embedfleet.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "cpu_flags",
    "cpu_supports_bf16",
    "resolve_device",
    "resolve_precision",
    "activation_bytes_per_token",
    "gpu_batch_tokens",
    "tune_allocator",
    "release_freed_memory",
    "bound_kernel_caches",
    "KERNEL_CACHE_ENTRIES",
]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (~2x fp32 here); without them bf16 is emulated and slower."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """The precision to load a torch model at on ``device`` (already resolved)."""
    on_gpu = device.startswith("cuda")
    if precision == "auto":
        if on_gpu:
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and not on_gpu:
        raise ConfigError(
            f"precision fp16 needs a CUDA device; this worker (pid {os.getpid()}) embeds on {device}. "
            "Use bf16 (or auto) or fp32 on CPU."
        )
    if precision == "bf16" and not on_gpu and not cpu_supports_bf16():
        logger.warning("bf16 on a CPU without AVX512-BF16/AMX is emulated and slower than fp32")
    return precision


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 64 * 2**20
_allocator_tuned = False


@functools.lru_cache(maxsize=1)
def _glibc():
    """This process's glibc with the malloc tuning calls, or None (another libc, not Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - musl and others lack one or both
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> bool:
    """Let glibc reuse freed activation buffers instead of mapping and faulting fresh pages per batch.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand memory back to
    the OS promptly). Setting any threshold turns off glibc's dynamic mmap threshold, so every
    allocation over 128 KiB — every activation tensor of a forward pass — becomes a fresh
    ``mmap`` whose pages fault in one by one and are unmapped on free. Measured with MiniLM on
    2 cores under that environment: ~8,400 minor page faults and 12-19 ms of system time per
    text; with the thresholds below, ~0 faults and ~2 ms at batch budgets up to 4096 tokens.
    Up to 64 MiB of freed heap may stay resident between batches, which a model-holding worker
    can afford. Called once per process when a torch or ONNX model is loaded; a no-op off glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    _allocator_tuned = ok
    if ok:
        logger.debug("glibc malloc: mmap threshold %d, trim threshold %d (pid %d)", _MMAP_THRESHOLD, _TRIM_THRESHOLD, os.getpid())
    return ok


def release_freed_memory() -> None:
    """Hand the heap pages freed by the last partition's forward passes back to the OS.

    With the thresholds of :func:`tune_allocator`, activations live in the heap, and batches
    of ever-different shapes fragment it: a worker's RSS crept up partition after partition
    (1.2 -> 1.4 GiB per worker over a 50k-chunk run). ``malloc_trim(0)`` after each
    partition returns every free page, not only the heap's top; measured in one process over
    ten 512-chunk partitions: RSS 661 -> 767 MiB without it, 580 -> 614 MiB with it, at the
    same speed (it takes a few milliseconds). A no-op off glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


#: Entries kept in torch's shape-keyed CPU kernel caches: oneDNN's primitive cache and ideep's
#: per-thread cache of the primitives it builds (both default to 1,024).
KERNEL_CACHE_ENTRIES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 8, "LRU_CACHE_CAPACITY": 1}


def bound_kernel_caches() -> dict[str, str]:
    """Keep torch's CPU kernel caches small, so a worker's memory does not grow with the batch shapes it has seen.

    torch runs bf16 matmuls through oneDNN, and every primitive it builds (JIT code and its own
    scratch space) is kept in caches keyed by shape. Token-budget batches of texts of every
    length are a new shape almost every batch. Measured with MiniLM bf16 on this project's test
    machine:

    * each new shape kept ~2.4 MiB resident: one process went 654 -> 1,084 MiB over 240 shapes;
    * over 30 partitions of 512 synthetic chunks (the 50k benchmark's corpus), with 64-entry
      caches the memory left after each partition was flat (704 MiB), but the peak within a
      partition climbed 833 -> 1,004 MiB: long-lived primitives scattered among the freed
      activations fragment glibc's heap;
    * with these bounds the peak stayed at 655-706 MiB over 10 such partitions and the time
      was the same (93.8 s against 90.4-96.1 s at 64 entries). oneDNN's 8 entries are the few
      shapes one forward pass reuses in each of its layers; with none it rebuilds them per
      layer and ran 4-8% slower.

    Both libraries read these variables when they first build a kernel, so this runs before the
    process's first forward pass; a value already in the environment wins. Returns what is in
    force.
    """
    for variable, entries in KERNEL_CACHE_ENTRIES.items():
        os.environ.setdefault(variable, str(entries))
    return {variable: os.environ[variable] for variable in KERNEL_CACHE_ENTRIES}


# Budgets beyond this give no speed-up worth the risk of one huge allocation.
MAX_GPU_BATCH_TOKENS = 262_144


def activation_bytes_per_token(
    *, hidden_size: int, intermediate_size: int, num_heads: int, max_seq_length: int, element_bytes: int
) -> int:
    """Peak activation bytes per padded token of one encoder layer at inference.

    Inference frees each layer's activations before the next, so the peak is one layer's:
    the feed-forward intermediate plus a few hidden-sized tensors (q, k, v, output) plus the
    attention scores and probabilities (heads x sequence length, twice).
    """
    elements = intermediate_size + 4 * hidden_size + 2 * num_heads * max_seq_length
    return elements * element_bytes


def gpu_batch_tokens(requested: int, *, free_bytes: int, bytes_per_token: int, fraction: float = 0.5) -> int:
    """The batch budget on a GPU: grown to use ``fraction`` of free memory, never below ``requested``.

    Half the free memory leaves room for the allocator's fragmentation and other processes;
    an out-of-memory error halves the budget anyway (see :mod:`embedfleet.embedders.base`).
    """
    if bytes_per_token <= 0:
        return requested
    grown = int(free_bytes * fraction) // bytes_per_token
    return max(requested, min(grown, MAX_GPU_BATCH_TOKENS))
