"""Worker memory over a long job, measured task by task inside each worker; prints JSON.

``throughput.py`` samples each process's RSS from outside every 0.2 s: good for a peak, too
coarse to tell slow growth from one partition's larger batches. This runs one job the way
``embedfleet index`` does (the Python API, a new LocalCluster from embedfleet's own
``connect``, the default embedded Chroma store) on a synthetic corpus, with a worker plugin
that, in every worker process,

* resets the process's peak RSS (``VmHWM``, via ``/proc/self/clear_refs``) as each embedding
  task starts, and reads it when the task ends: that task's **peak**;
* reads the RSS the task left behind (after its ``malloc_trim``): what the worker **keeps**.

Per worker it reports both per quarter of its tasks (max and median) and their least-squares
slope in MiB per 10,000 chunks that worker embedded. Flat means the slope of what a worker
keeps is ~0 and the last quarter's peaks are no higher than the first's. Linux only (procfs).

Usage::

    python benchmarks/worker_memory.py --synthetic 50000                 # precision auto
    python benchmarks/worker_memory.py --synthetic 50000 --precision bf16
    DASK_EMBEDFLEET__CLUSTER__PROFILE=True python benchmarks/worker_memory.py        # Dask's profiler on, 10 s cycle
    DASK_EMBEDFLEET__CLUSTER__PROFILE=True DASK_EMBEDFLEET__CLUSTER__PROFILE_CYCLE=1s \
        python benchmarks/worker_memory.py                                         # ... at Dask's own 1 s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Also registers --backend fake (tests/fake_embedder.py) through embedfleet.backends, before dask reads its config.
from throughput import _synthetic_corpus, emit_json  # noqa: E402

import embedfleet  # noqa: E402
from embedfleet import config  # noqa: E402
from embedfleet.embedders.hardware import cpu_supports_bf16  # noqa: E402
from embedfleet.pipeline.embedding import EMBED_KEY_PREFIX, embed_task_key  # noqa: E402
from embedfleet.frames.io import read_json, sidecar  # noqa: E402


def _proc_status_kib(*fields: str) -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(fields)}


class TaskMemory(WorkerPlugin):
    """Appends one JSON line per finished embedding task to ``out``: its peak and retained RSS."""

    name = "benchmark-task-memory"

    def __init__(self, out: str):
        self.out = out
        self.started: dict[str, float] = {}

    def transition(self, key, start, finish, **kwargs):
        key = str(key)
        if not key.startswith(EMBED_KEY_PREFIX):
            return
        if finish == "executing":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.started[key] = time.time()
        elif start == "executing":
            kib = _proc_status_kib("VmHWM", "VmRSS")
            record = {"pid": os.getpid(), "key": key, "ended": time.time(),
                      "seconds": time.time() - self.started.pop(key, time.time()),
                      "peak_kib": kib["VmHWM"], "after_kib": kib["VmRSS"], "finish": finish}
            with open(self.out, "a") as f:  # one short O_APPEND write per line: workers do not interleave
                f.write(json.dumps(record) + "\n")


def _slope_per_10k(rows: np.ndarray, values: np.ndarray) -> float:
    if len(values) < 2:
        return 0.0
    return round(float(np.polyfit(np.cumsum(rows), values, 1)[0]) * 10_000, 1)


def _by_quarter(values: np.ndarray) -> dict[str, list[float]]:
    quarters = [q for q in np.array_split(values, 4) if len(q)]
    return {"max": [round(float(q.max()), 1) for q in quarters], "median": [round(float(np.median(q)), 1) for q in quarters]}


def summarise(records: list[dict], rows_of: dict[str, int]) -> list[dict]:
    workers = []
    for pid in sorted({r["pid"] for r in records}):
        tasks = sorted((r for r in records if r["pid"] == pid and r["finish"] == "memory"), key=lambda r: r["ended"])
        rows = np.array([rows_of.get(r["key"], 0) for r in tasks], dtype=float)
        peak = np.array([r["peak_kib"] / 1024 for r in tasks])
        after = np.array([r["after_kib"] / 1024 for r in tasks])
        workers.append({
            "pid": pid,
            "tasks": len(tasks),
            "chunks": int(rows.sum()),
            "median_task_seconds": round(float(np.median([r["seconds"] for r in tasks])), 1),
            "peak_mib_by_quarter": _by_quarter(peak),
            "kept_mib_by_quarter": _by_quarter(after),
            "peak_slope_mib_per_10k_chunks": _slope_per_10k(rows, peak),
            "kept_slope_mib_per_10k_chunks": _slope_per_10k(rows, after),
            "peak_mib": [round(v) for v in peak],
            "kept_mib": [round(v) for v in after],
        })
    return workers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=int, default=50_000, metavar="N", help="~N chunks of synthetic text")
    parser.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--backend", default=None, help="embedfleet backend (default: the model's)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: embedfleet's layout)")
    parser.add_argument("--json-out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("needs Linux procfs (/proc/self/clear_refs) to read a task's peak RSS")

    with tempfile.TemporaryDirectory(prefix="embedfleet-memory-") as tmp:
        tmp_path = Path(tmp)
        source = _synthetic_corpus(args.synthetic, tmp_path, chunk_size=config.chunk_spec().size)
        records_path = tmp_path / "tasks.jsonl"
        data_dir = tmp_path / "data"
        load_before = os.getloadavg()[0]
        result = embedfleet.index(
            str(source), collection="memory", data_dir=str(data_dir), precision=args.precision, backend=args.backend,
            workers=args.workers, mode="full", user="bench",
            on_cluster=lambda client: client.register_plugin(TaskMemory(str(records_path))),
        )
        if result.status != "succeeded":
            raise SystemExit(f"job {result.status}: {result.error}")
        embeddings = data_dir / "jobs" / result.job_id / "embeddings"
        rows_of = {embed_task_key(result.job_id, p): read_json(sidecar(p))["rows"]
                   for p in embeddings.glob("*.parquet")}
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        report = {
            "corpus": f"synthetic:{args.synthetic}",
            "chunks": result.chunks,
            "embedded": result.embedded,
            "precision": result.precision,
            "job_seconds": round(result.seconds, 1),
            "chunks_per_second": round(result.chunks_per_second, 1),
            "config": {"profile": config.get("cluster.profile"), "profile_cycle": config.get("cluster.profile-cycle"),
                       "chunks_per_partition": config.get("embed.chunks-per-partition"),
                       "batch_tokens": config.get("embed.batch-tokens") or "auto"},
            "machine": {"cores": len(os.sched_getaffinity(0)), "bf16_native": cpu_supports_bf16(),
                        "load_average_1m_before": round(load_before, 2),
                        "load_average_1m_after": round(os.getloadavg()[0], 2)},
            "workers": summarise(records, rows_of),
        }
    emit_json(report, args.json_out)
    return report


if __name__ == "__main__":
    main()
