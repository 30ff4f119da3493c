"""Incremental re-indexing benchmark; prints one JSON document.

Wall time of three runs of one corpus into one collection:

* ``first``: a full index (every chunk embedded);
* ``unchanged``: the same corpus again (nothing to embed, nothing to delete);
* ``edited``: after one document was edited (a sentence inserted in its middle).

each measured two ways:

* ``warm``: jobs through ``embedfleet.index(..., client=client)`` on one LocalCluster started
  before the clock runs, so the model stays resident between runs (what a long-running
  service or a notebook sees; the first run includes the model load on the worker);
* ``cli``: separate ``python -m embedfleet.cli index`` processes, each importing embedfleet and
  starting its own LocalCluster (what a user at a shell sees).

The corpus is copied to a scratch folder (twice: one copy per mode) so edits never touch the
original; a built-in dataset (default ``python-docs``) is exported there as one ``.txt`` file
per document. The aim is ``unchanged`` at least 20x faster than ``first``.

Usage::

    python benchmarks/incremental.py                              # python-docs, real model (minilm)
    python benchmarks/incremental.py --corpus ./docs --model minilm
    python benchmarks/incremental.py --skip-cli                   # the warm numbers only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import embedfleet  # noqa: F401  (config defaults)

EDIT = " This sentence was inserted to measure an incremental re-run after an edit. "


def _export(corpus: str, target: Path) -> Path:
    """A private, editable folder copy of ``corpus`` (a folder, or a built-in dataset)."""
    from embedfleet.datasets import get_builtin, known_builtins

    path = Path(corpus)
    if path.is_dir():
        shutil.copytree(path, target)
        return target
    if corpus.removeprefix("builtin:") in known_builtins() and not path.exists():
        dataset = get_builtin(corpus.removeprefix("builtin:"))
        target.mkdir(parents=True)
        for key, text in sorted(dataset.load().items()):
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
            (target / f"{safe}.txt").write_text(text, encoding="utf-8")
        return target
    raise SystemExit(f"--corpus must be a folder or a built-in dataset ({', '.join(known_builtins())}), not {corpus!r}")


def _edit_one(folder: Path, extensions: tuple[str, ...]) -> str:
    """Insert a sentence in the middle of the median-sized document; returns its relative path."""
    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions),
                   key=lambda p: (p.stat().st_size, str(p)))
    target = files[len(files) // 2]
    text = target.read_text(encoding="utf-8")
    middle = text.find(" ", len(text) // 2)
    middle = len(text) // 2 if middle < 0 else middle
    target.write_text(text[:middle] + EDIT + text[middle:], encoding="utf-8")
    return str(target.relative_to(folder))


def _summary(result: dict, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 3),
        "job_seconds": round(result["seconds"], 3),
        "documents": result["documents"],
        "chunks": result["chunks"],
        "embedded": result["embedded"],
        "unchanged": result["skipped"],
        "deleted": result["deleted"],
    }


def _ratios(runs: dict) -> dict:
    first = runs["first"]["seconds"]
    return {
        "unchanged_speedup": round(first / runs["unchanged"]["seconds"], 1),
        "edited_speedup": round(first / runs["edited"]["seconds"], 1),
    }


def warm(corpus: Path, data_dir: Path, options: dict, workers: int | None) -> dict:
    from embedfleet.pipeline.cluster import connect

    runs: dict = {}
    started = time.perf_counter()
    with connect(workers=workers) as client:
        runs["cluster_start_seconds"] = round(time.perf_counter() - started, 3)
        for name in ("first", "unchanged", "edited"):
            if name == "edited":
                runs["edited_document"] = _edit_one(corpus, options["extensions"])
            t = time.perf_counter()
            result = embedfleet.index(str(corpus), client=client, data_dir=str(data_dir), **options["api"])
            seconds = time.perf_counter() - t
            if result.status != "succeeded":
                raise SystemExit(f"warm {name} run {result.status}: {result.error}")
            runs[name] = _summary(result.to_dict(), seconds)
    runs.update(_ratios(runs))
    return runs


def cli(corpus: Path, data_dir: Path, options: dict, workers: int | None) -> dict:
    args = [sys.executable, "-m", "embedfleet.cli", "index", str(corpus), "--data-dir", str(data_dir), "--json",
            *options["cli"]]
    if workers:
        args += ["--workers", str(workers)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs: dict = {}
    for name in ("first", "unchanged", "edited"):
        if name == "edited":
            runs["edited_document"] = _edit_one(corpus, options["extensions"])
        t = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"cli {name} run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        runs[name] = _summary(json.loads(done.stdout.strip().splitlines()[-1]), seconds)
    runs.update(_ratios(runs))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="python-docs", help="a folder or a built-in dataset (default python-docs)")
    parser.add_argument("--model", default=None, help="a model from embedfleet.models (default: embed.model, minilm)")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--chunk-overlap", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes (default 1)")
    parser.add_argument("--data-dir", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--skip-cli", action="store_true", help="only the warm-cluster numbers")
    parser.add_argument("--skip-warm", action="store_true", help="only the separate-CLI-process numbers")
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args()
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING)
    for noisy in ("distributed", "embedfleet"):
        logging.getLogger(noisy).setLevel(logging.INFO if ns.verbose else logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from embedfleet import config

    api = {k: v for k, v in dict(model=ns.model, chunk_size=ns.chunk_size, chunk_overlap=ns.chunk_overlap).items()
           if v is not None}
    cli_args = []
    for key, value in api.items():
        cli_args += [f"--{key.replace('_', '-')}", str(value)]
    options = {"api": {**api, "collection": "bench"}, "cli": [*cli_args, "--collection", "bench"],
               "extensions": tuple(config.get("read.extensions"))}

    scratch = Path(ns.data_dir) if ns.data_dir else Path(tempfile.mkdtemp(prefix="embedfleet-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "benchmark": "incremental",
        "corpus": ns.corpus,
        "model": ns.model or config.get("embed.model"),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        if not ns.skip_warm:
            corpus = _export(ns.corpus, scratch / "warm-corpus")
            out["warm"] = warm(corpus, scratch / "warm-data", options, ns.workers)
        if not ns.skip_cli:
            corpus = _export(ns.corpus, scratch / "cli-corpus")
            out["cli"] = cli(corpus, scratch / "cli-data", options, ns.workers)
    finally:
        if not ns.data_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
