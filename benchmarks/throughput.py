"""Embedding throughput: plain sentence-transformers vs ``embedfleet index`` end to end; prints JSON.

In one run, on one machine, for the same chunks:

a. the corpus is chunked with embedfleet's own chunker and settings (``embedfleet.chunk.*``);
b. **baseline**: ``SentenceTransformer.encode(texts, batch_size=32, normalize_embeddings=True)``
   in this process (model loaded and warmed up first, so only encoding is timed); and the
   **cold baseline**: the hand-written script a user would write instead of embedfleet, from a
   fresh interpreter and timed whole: import sentence-transformers and chromadb, load the model,
   encode, add the vectors with their texts to a new Chroma collection;
c. **fp32, cold**: ``embedfleet index`` in a subprocess with its own new LocalCluster, a fresh
   data dir and the default embedded Chroma store. ``e2e_chunks_per_second`` is chunks / the
   job's seconds (``JobResult.seconds``: read, chunk, embed, write, commit, and here the model
   load, which a new worker cannot avoid); ``embed_chunks_per_second`` is the embed stage's rate;
   ``process_seconds`` adds interpreter start-up and the cluster's start and stop, and is
   compared with the cold baseline (``ratio_process_to_cold_baseline``);
d. **fp32, warm** (``fp32_warm``): the same job, ``embedfleet index --scheduler``, on a cluster
   this benchmark keeps running, whose worker already holds the model (loaded by a small job
   first) — every job but the first on a long-lived cluster or under the job service. Like
   the baseline, it does not pay the model load;
e. **bf16** (where the CPU has native bf16), cold and warm: the same with ``--precision bf16``,
   plus the cosine of every bf16 vector to its fp32 vector, both read back from Chroma;
f. the peak RSS of every process of each run (the driver, which also writes to Chroma, and
   each Dask worker), sampled with psutil every 0.2 s.

Targets (issue 6): fp32 end to end >= 0.9x the baseline; bf16 >= 1.8x the fp32 baseline with
cosine >= 0.995 on every vector (``targets`` says which held, for the cold and the warm runs
separately); worker RSS flat over a 50k-chunk run: ``peak_rss_mib`` here, task by task in
``worker_memory.py``. Issue 20: the bf16 process >= 1.8x the cold baseline's on ~500 chunks
(``--limit 500 --process-only``: only whole processes, interleaved).

Usage::

    python benchmarks/throughput.py                           # python-docs (~800 chunks)
    python benchmarks/throughput.py --repeat 3 --onnx         # medians of 3 interleaved rounds, plus ONNX
    python benchmarks/throughput.py --limit 500 --process-only --repeat 5   # whole processes only: script vs index
    python benchmarks/throughput.py --backends --limit 400    # the backends table (benchmarks/backends.py)
    python benchmarks/throughput.py ./docs --limit 2000 --json-out result.json
    python benchmarks/throughput.py --synthetic 50000 --backend fake --skip-baseline --skip-bf16 --skip-warm
    python benchmarks/throughput.py --synthetic 50000 --skip-baseline --skip-fp32 --skip-warm   # real model, bf16
    DASK_EMBEDFLEET__EMBED__BATCH_TOKENS=16384 python benchmarks/throughput.py   # any embedfleet.* key
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# --backend fake is the tests' embedder (tests/fake_embedder.py), registered through the
# embedfleet.backends config key for this process, its CLI runs and their workers.
_REPO = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("DASK_EMBEDFLEET__BACKENDS", json.dumps({"fake": "tests.fake_embedder:FakeEmbedder"}))
if _REPO not in sys.path:
    sys.path.append(_REPO)

import numpy as np

import embedfleet  # noqa: F401  (config defaults)
from embedfleet import config

if "fake" not in (config.get("backends", None) or {}):  # dask read its config before the line above set it
    import dask.config

    dask.config.set({"embedfleet.backends.fake": "tests.fake_embedder:FakeEmbedder"})

logger = logging.getLogger("benchmarks.throughput")

USER = "bench"
#: The environment as this benchmark started, for its subprocesses: a Dask nanny started in
#: this process (the warm runs' cluster) sets OMP_NUM_THREADS=1 and friends in os.environ.
CLEAN_ENV = dict(os.environ)


# --------------------------------------------------------------------------- corpus and chunks


def _synthetic_corpus(n_chunks: int, out: Path, *, chunk_size: int) -> Path:
    """A JSONL file of documents that chunk into about ``n_chunks`` chunks of ``chunk_size`` tokens.

    Words are drawn (seeded) from the vocabulary of Python's help topics, so token counts and
    the tokenizer's work look like real English technical text.
    """
    from pydoc_data.topics import topics

    vocabulary = sorted({w for text in topics.values() for w in text.split() if w.isalpha() and len(w) < 14})
    rng = random.Random(6)
    # ~0.75 words per token for this vocabulary; 4 chunks per document with the default overlap.
    words_per_doc = int(chunk_size * 0.75 * 3.4)
    path = out / "synthetic.jsonl"
    with open(path, "w") as f:
        for i in range(max(1, n_chunks // 4)):
            text = " ".join(rng.choices(vocabulary, k=words_per_doc))
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return path


def _chunk_corpus(source: str, *, limit: int | None) -> tuple[list[str], list[int]]:
    """The chunk texts and token counts embedfleet makes of ``source``, in this process."""
    import pyarrow as pa

    from embedfleet.datasets import plan_partitions, read_partition, source_spec
    from embedfleet.tasks.chunking import chunk_partition, reserved_tokens

    model = config.model_spec()
    model_path = config.resolve_model_path(model.path)
    chunk = config.chunk_spec()
    max_tokens = model.max_seq_length - reserved_tokens(model_path, prefix=model.document_prefix)
    spec = source_spec(source)
    texts: list[str] = []
    counts: list[int] = []
    for part in plan_partitions(spec):
        documents: pa.Table = read_partition(spec, part)
        table = chunk_partition(documents, unit=chunk.unit, size=chunk.size, overlap=chunk.overlap,
                                model_path=model_path, max_tokens=max_tokens)
        texts += table.column("text").to_pylist()
        counts += table.column("n_tokens").to_pylist()
        if limit is not None and len(texts) >= limit:
            break
    if limit is not None:
        texts, counts = texts[:limit], counts[:limit]
    return texts, counts


def _chunks_as_corpus(texts: list[str], out: Path) -> Path:
    """One JSONL document per chunk: the job re-chunks each into exactly that one chunk."""
    path = out / "chunks.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"chunk-{i:07d}", "text": text}) + "\n" for i, text in enumerate(texts))
    return path


# --------------------------------------------------------------------------- baseline


def _baseline(texts: list[str], counts: list[int]) -> tuple[dict, np.ndarray]:
    import torch
    from sentence_transformers import SentenceTransformer

    # All cores, as a plain script gets them; a Dask nanny in this process (the warm runs'
    # cluster) may have set OMP_NUM_THREADS=1 in the environment.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = SentenceTransformer(config.resolve_model_path(config.model_spec().path), device="cpu")
    model.encode(texts[:32], batch_size=32, normalize_embeddings=True)  # warm-up, not timed
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    seconds = time.perf_counter() - started
    tokens = sum(counts) + 2 * len(counts)
    return {
        "seconds": round(seconds, 2),
        "texts_per_second": round(len(texts) / seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }, vectors


# --------------------------------------------------------------------------- RSS sampling


class _RssSampler:
    """Peak RSS of a process and all its descendants (the Dask workers), sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2, *, workers_of: int | None = None):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        # A cluster started elsewhere (the warm runs): its worker processes are sampled too.
        self.workers_root = psutil.Process(workers_of) if workers_of is not None else None
        self.interval = interval
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self, proc) -> None:
        try:
            rss = proc.memory_info().rss
            entry = self.peaks.get(proc.pid)
            if entry is None:
                role = _role(proc)
                if proc.pid == self.root.pid:
                    role = "driver"
                elif self.workers_root is not None and role != "worker":
                    role = "other"  # the benchmark's own helpers, not part of the job
                entry = self.peaks[proc.pid] = {"pid": proc.pid, "role": role, "peak_rss_bytes": 0, "series": []}
            entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], rss)
            entry["series"].append((time.monotonic(), rss))
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                if self.workers_root is not None:
                    procs += [p for p in self.workers_root.children(recursive=True) if p.pid != self.root.pid]
            except self._psutil.NoSuchProcess:
                return
            for proc in procs:
                self._sample(proc)
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        mib = lambda b: round(b / 2**20, 1)
        forkservers = [p for p in self.peaks.values() if p["role"] == "forkserver"]
        # Short-lived helpers (the resource tracker) are not workers: keep processes that held a model-sized RSS.
        workers = [p for p in self.peaks.values() if p["role"] == "worker" and p["peak_rss_bytes"] > 100 * 2**20]
        drivers = [p for p in self.peaks.values() if p["role"] == "driver"]
        return {
            "driver_mib": mib(max((p["peak_rss_bytes"] for p in drivers), default=0)),
            # The process a LocalCluster's workers fork from: imported modules the workers share.
            "forkserver_mib": mib(max((p["peak_rss_bytes"] for p in forkservers), default=0)),
            "workers_mib": [mib(p["peak_rss_bytes"]) for p in sorted(workers, key=lambda p: p["pid"])],
            # Flat means the last quarters peak no higher than the first: memory does not grow
            # with the chunks a worker has embedded.
            "workers_peak_mib_by_quarter_of_run": [_by_quarter(p["series"], mib) for p in sorted(workers, key=lambda p: p["pid"])],
        }


def _role(proc) -> str:
    """A Dask worker process (spawned, or forked by a forkserver), a forkserver, or anything else ("driver")."""
    cmdline = " ".join(proc.cmdline())
    if "multiprocessing" in cmdline and "spawn_main" in cmdline:
        return "worker"
    if "multiprocessing.forkserver" in cmdline:
        # Forked children keep their forkserver's command line: a worker's parent is the forkserver.
        parent = proc.parent()
        return "worker" if parent is not None and "multiprocessing.forkserver" in " ".join(parent.cmdline()) else "forkserver"
    return "driver"


def _by_quarter(series: list[tuple[float, int]], mib) -> list[float]:
    start, end = series[0][0], series[-1][0]
    span = max(end - start, 1e-9)
    peaks = [0] * 4
    for t, rss in series:
        quarter = min(3, int(4 * (t - start) / span))
        peaks[quarter] = max(peaks[quarter], rss)
    return [mib(p) for p in peaks]


# --------------------------------------------------------------------------- one embedfleet run


def _index(source: Path | str, *, data_dir: Path, collection: str, precision: str, backend: str | None,
           workers: int | None, extra_env: dict[str, str], scheduler: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "embedfleet.cli", "index", str(source), "--json", "--data-dir", str(data_dir),
           "--collection", collection, "--user", USER, "--precision", precision, "--mode", "full"]
    if backend:
        cmd += ["--backend", backend]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    elif workers:
        cmd += ["--workers", str(workers)]
    env = {**CLEAN_ENV, **extra_env}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with _RssSampler(proc.pid, workers_of=os.getpid() if scheduler else None) as sampler:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"embedfleet index failed ({proc.returncode}):\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"result": result, "process_seconds": wall, "rss": sampler.summary()}


def _summarise(run: dict, *, chunks: int, baseline: dict | None = None) -> dict:
    result = run["result"]
    if result["embedded"] != chunks:
        logger.warning("the job embedded %d chunks, the benchmark made %d", result["embedded"], chunks)
    e2e = result["embedded"] / result["seconds"] if result["seconds"] else 0.0
    out = {
        "chunks": result["embedded"],
        "job_seconds": round(result["seconds"], 2),
        "embed_seconds": round(result["embed_seconds"], 2),
        "process_seconds": round(run["process_seconds"], 2),
        "e2e_chunks_per_second": round(e2e, 2),
        "embed_chunks_per_second": round(result["chunks_per_second"], 2),
        "embed_tokens_per_second": round(result["tokens_per_second"], 1),
        "padding_efficiency": round(result["padding_efficiency"], 4) if result["padding_efficiency"] else None,
        "precision": result["precision"],
        "peak_rss_mib": run["rss"],
    }
    if baseline:
        out["ratio_e2e_to_baseline"] = round(e2e / baseline["texts_per_second"], 3)
        out["ratio_embed_to_baseline"] = round(result["chunks_per_second"] / baseline["texts_per_second"], 3)
    return out


def _read_vectors(data_dir: Path, collection: str) -> dict[str, np.ndarray]:
    import chromadb

    from embedfleet.sinks.naming import physical_name

    client = chromadb.PersistentClient(path=str(data_dir / "chroma"))
    stored = client.get_collection(physical_name(USER, collection))
    out: dict[str, np.ndarray] = {}
    offset, page = 0, 5000
    while True:
        got = stored.get(include=["embeddings", "documents"], limit=page, offset=offset)
        if not got["ids"]:
            break
        for text, vector in zip(got["documents"], got["embeddings"]):
            out[text] = np.asarray(vector, dtype=np.float32)
        offset += len(got["ids"])
    return out


def _cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    keys = sorted(set(a) & set(b))
    x = np.stack([a[k] for k in keys])
    y = np.stack([b[k] for k in keys])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    cos = (x * y).sum(axis=1)
    return {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5), "compared": len(keys)}


# --------------------------------------------------------------------------- main


def _median_run(rounds: list[dict]) -> dict:
    """Median of each rate over rounds; the largest peak RSS; the rounds' e2e rates for the record."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[len(rounds) // 2])
    for key in ("job_seconds", "embed_seconds", "process_seconds", "e2e_chunks_per_second",
                "embed_chunks_per_second", "embed_tokens_per_second"):
        out[key] = round(statistics.median(r[key] for r in rounds), 2)
    out["peak_rss_mib"] = {
        "driver_mib": max(r["peak_rss_mib"]["driver_mib"] for r in rounds),
        "forkserver_mib": max(r["peak_rss_mib"]["forkserver_mib"] for r in rounds),
        "workers_mib": [max(ws) for ws in zip(*(r["peak_rss_mib"]["workers_mib"] for r in rounds))],
    }
    out["rounds_e2e_chunks_per_second"] = [r["e2e_chunks_per_second"] for r in rounds]
    out["rounds_process_seconds"] = [r["process_seconds"] for r in rounds]
    return out


def _preexport_onnx(data_dir: Path) -> None:
    """Export the ONNX model into the run's model cache first: export once, then reuse, is the steady state."""
    from embedfleet.embedders.onnx import export_model

    model = config.model_spec()
    export_model(model.name, config.resolve_model_path(model.path), str(data_dir / "models"),
                 max_seq_length=model.max_seq_length)


def _cold_baseline(texts: list[str], tmp: Path, run: int) -> dict:
    """The hand-written script from a fresh interpreter: import, load, encode, store; the process's wall time.

    The like-for-like comparison for a cold ``embedfleet index`` (its ``process_seconds``),
    which also ends with the vectors and texts in a new embedded Chroma collection.
    """
    corpus = tmp / "baseline-texts.json"
    corpus.write_text(json.dumps(texts))
    script = (
        "import json\n"
        "import chromadb\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"texts = json.load(open({str(corpus)!r}))\n"
        f"model = SentenceTransformer({config.resolve_model_path(config.model_spec().path)!r}, device='cpu')\n"
        "vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False)\n"
        f"store = chromadb.PersistentClient(path={str(tmp / f'baseline-chroma-{run}')!r})\n"
        "collection = store.create_collection('baseline', metadata={'hnsw:space': 'cosine'})\n"
        "for i in range(0, len(texts), 1000):\n"
        "    collection.add(ids=[str(j) for j in range(i, min(i + 1000, len(texts)))],\n"
        "                   documents=texts[i:i + 1000], embeddings=vectors[i:i + 1000])\n"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True, env={**CLEAN_ENV, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    return {"process_seconds": round(seconds, 2), "texts_per_second": round(len(texts) / seconds, 2)}


def _warm_up(cluster_address: str, texts: list[str], tmp: Path, *, precision: str, backend: str | None) -> None:
    """Load the variant's model on the shared cluster with a small job, as any earlier job would have."""
    source = tmp / "warm-up"
    source.mkdir(exist_ok=True)
    _chunks_as_corpus(texts[:16], source)
    _index(source / "chunks.jsonl", data_dir=tmp / "warm-up-data", collection=f"warm-{precision}-{backend or 'st'}",
           precision=precision, backend=backend, workers=None, extra_env={}, scheduler=cluster_address)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="?", default="python-docs", help="a folder, a .jsonl file, or python-docs")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N chunks")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N", help="generate ~N chunks of text instead")
    parser.add_argument("--backend", default=None, help="embedfleet backend for the runs (e.g. fake for RSS flatness)")
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes (default: embedfleet's)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of baseline/fp32/bf16, interleaved; medians reported")
    parser.add_argument("--onnx", action="store_true", help="also run --backend onnx (fp32), model exported beforehand")
    parser.add_argument("--backends", action="store_true",
                        help="only the backends table (benchmarks/backends.py): torch fp32/bf16, onnx fp32/int8, openvino")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-fp32", action="store_true", help="only bf16 (e.g. a long RSS run); no cosines")
    parser.add_argument("--skip-cold", action="store_true", help="only the runs on a warm cluster")
    parser.add_argument("--skip-warm", action="store_true", help="only the cold runs (each its own new cluster)")
    parser.add_argument("--process-only", action="store_true",
                        help="only whole processes: the cold baseline script and cold embedfleet runs (implies --skip-warm)")
    parser.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.process_only:
        args.skip_warm = True
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the warm runs' cluster lives in this process

    from embedfleet.embedders.hardware import cpu_supports_bf16
    from embedfleet.pipeline.cluster import connect, local_layout

    modes = [m for m, skip in (("cold", args.skip_cold), ("warm", args.skip_warm)) if not skip]
    with tempfile.TemporaryDirectory(prefix="embedfleet-bench-") as tmp, contextlib.ExitStack() as stack:
        tmp_path = Path(tmp)
        source: str | Path = args.corpus
        if args.synthetic:
            source = _synthetic_corpus(args.synthetic, tmp_path, chunk_size=config.chunk_spec().size)
        started = time.perf_counter()
        texts, counts = _chunk_corpus(str(source), limit=args.limit)
        chunk_seconds = time.perf_counter() - started
        job_env: dict[str, str] = {}
        if args.limit is not None:
            # The job must embed exactly these chunks: give it each chunk as one document, with
            # a chunk size of the model's whole budget so no chunk (up to size + a word-piece
            # or two after re-tokenisation) is split again.
            source = _chunks_as_corpus(texts, tmp_path)
            job_env["DASK_EMBEDFLEET__CHUNK__SIZE"] = str(max(config.chunk_spec().size, max(counts, default=1)) + 16)
        report: dict = {
            "corpus": f"synthetic:{args.synthetic}" if args.synthetic else args.corpus,
            "chunks": len(texts),
            "mean_tokens_per_chunk": round(float(np.mean(counts)), 1) if counts else 0,
            "benchmark_chunking_seconds": round(chunk_seconds, 2),
            "machine": {"cores": len(os.sched_getaffinity(0)), "bf16_native": cpu_supports_bf16(),
                        "load_average_1m": round(os.getloadavg()[0], 2)},
            "config": {"batch_tokens": config.get("embed.batch-tokens") or "auto",
                       "chunks_per_partition": config.get("embed.chunks-per-partition"),
                       "workers_and_threads": local_layout(workers=args.workers),
                       "repeat": args.repeat},
        }
        if args.backends:
            from benchmarks.backends import backends_table, format_table

            report["backends"] = backends_table(texts, counts, cache_dir=str(tmp_path / "models"), repeat=args.repeat)
            print(format_table(report["backends"]), file=sys.stderr)
            emit_json(report, args.json_out)
            return report
        variants = [] if args.skip_fp32 else [("fp32", "fp32", args.backend)]
        if not args.skip_bf16 and cpu_supports_bf16():
            variants.append(("bf16", "bf16", args.backend))
        if args.onnx:
            variants.append(("onnx", "fp32", "onnx"))

        cluster_address = None
        if "warm" in modes:
            # One long-lived cluster, as under the job service or `--scheduler`: each variant's
            # model is loaded by a small job first and stays resident for the measured one.
            client = stack.enter_context(connect(workers=args.workers, dashboard_address=":0", backend=args.backend))
            cluster_address = client.scheduler.address

        baselines: list[dict] = []
        cold_baselines: list[dict] = []
        baseline_vectors = None
        rounds: dict[str, list[dict]] = {f"{name}{suffix}": [] for name, *_ in variants
                                         for suffix in (("",) if "cold" in modes else ()) + (("_warm",) if "warm" in modes else ())}
        data_dirs: dict[str, Path] = {}
        for r in range(args.repeat):
            if not args.skip_baseline:
                if not args.process_only:
                    result, baseline_vectors = _baseline(texts, counts)
                    baselines.append(result)
                if "cold" in modes:
                    cold_baselines.append(_cold_baseline(texts, tmp_path, r))
            for name, precision, backend in variants:
                for mode in modes:
                    key = name if mode == "cold" else f"{name}_warm"
                    data_dir = tmp_path / f"data-{key}-{r}"
                    if backend == "onnx":
                        _preexport_onnx(data_dir)
                    if mode == "warm" and r == 0:
                        _warm_up(cluster_address, texts, tmp_path, precision=precision, backend=backend)
                    run = _index(source, data_dir=data_dir, collection=f"bench-{name}", precision=precision,
                                 backend=backend, workers=args.workers, extra_env=job_env,
                                 scheduler=cluster_address if mode == "warm" else None)
                    rounds[key].append(_summarise(run, chunks=len(texts), baseline=None))
                    data_dirs[key] = data_dir  # the last round's store is read back below

        baseline = None
        if baselines:
            baseline = {
                "seconds": round(statistics.median(b["seconds"] for b in baselines), 2),
                "texts_per_second": round(statistics.median(b["texts_per_second"] for b in baselines), 2),
                "tokens_per_second": round(statistics.median(b["tokens_per_second"] for b in baselines), 1),
                "torch_threads": baselines[0]["torch_threads"],
                "rounds_texts_per_second": [b["texts_per_second"] for b in baselines],
            }
            report["baseline"] = baseline
        if cold_baselines:
            report["cold_baseline"] = {
                "process_seconds": round(statistics.median(b["process_seconds"] for b in cold_baselines), 2),
                "texts_per_second": round(statistics.median(b["texts_per_second"] for b in cold_baselines), 2),
                "rounds_process_seconds": [b["process_seconds"] for b in cold_baselines],
            }
        for key, runs in rounds.items():
            summary = _median_run(runs)
            if baseline:
                label = "baseline" if key.startswith("fp32") else "fp32_baseline"
                summary[f"ratio_e2e_to_{label}"] = round(summary["e2e_chunks_per_second"] / baseline["texts_per_second"], 3)
                summary[f"ratio_embed_to_{label}"] = round(summary["embed_chunks_per_second"] / baseline["texts_per_second"], 3)
            if cold_baselines and not key.endswith("_warm"):
                # Whole processes: interpreter, imports, model load (and for embedfleet the cluster).
                summary["ratio_process_to_cold_baseline"] = round(
                    report["cold_baseline"]["process_seconds"] / summary["process_seconds"], 3)
            report[key] = summary

        if args.backend in (None, "sentence-transformers") and not args.skip_fp32:
            reference_key = "fp32" if "fp32" in data_dirs else "fp32_warm"
            fp32 = _read_vectors(data_dirs[reference_key], "bench-fp32")
            if baseline_vectors is not None:
                report[reference_key]["cosine_to_baseline"] = _cosines(fp32, {t: v for t, v in zip(texts, baseline_vectors)})
            for key, run_dir in data_dirs.items():
                if not key.startswith("fp32"):
                    report[key]["cosine_to_fp32"] = _cosines(_read_vectors(run_dir, f"bench-{key.split('_')[0]}"), fp32)

        targets = {}
        if cold_baselines and report.get("bf16"):
            targets["bf16_process_at_least_1.8x_cold_baseline"] = report["bf16"]["ratio_process_to_cold_baseline"] >= 1.8
        for mode, suffix in (("cold", ""), ("warm", "_warm")):
            fp32, bf16 = report.get(f"fp32{suffix}"), report.get(f"bf16{suffix}")
            if baseline and fp32:
                targets[f"fp32_e2e_{mode}_at_least_0.9x_baseline"] = fp32["ratio_e2e_to_baseline"] >= 0.9
            if baseline and bf16:
                targets[f"bf16_e2e_{mode}_at_least_1.8x_fp32_baseline"] = bf16["ratio_e2e_to_fp32_baseline"] >= 1.8
                if "cosine_to_fp32" in bf16:
                    targets[f"bf16_{mode}_cosine_at_least_0.995_every_vector"] = bf16["cosine_to_fp32"]["min"] >= 0.995
        report["targets"] = targets
        report["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)

    emit_json(report, args.json_out)
    return report


def emit_json(report: dict, json_out: str | None) -> None:
    """Print a benchmark's report, and write it to ``json_out`` if given."""
    text = json.dumps(report, indent=1)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
