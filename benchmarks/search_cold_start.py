"""``embedfleet search`` in a fresh process: wall and CPU time, peak RSS, what it imported; prints JSON.

Each round runs ``python -m embedfleet.cli search QUERY`` as its own process (what a user at a
shell sees: interpreter start, imports, opening the store, loading the model, one query, exit)
and times it whole; ``--against DIR`` interleaves runs of another checkout of embedfleet (put
first on ``PYTHONPATH``), so both see the same machine load, and checks that both print the same
bytes. One extra run of each reports which heavy modules the process imported.

Without ``--data-dir`` a collection is made first in a scratch data dir: ``--corpus`` (a folder;
default: 10 man pages rendered as text where ``man`` exists, else the built-in ``python-docs``)
indexed with ``--backend onnx``, which leaves the model's ONNX export in the data dir's model
cache, so the search embeds its query with ONNX Runtime (no torch).

Usage::

    python benchmarks/search_cold_start.py                                  # scratch collection, 7 rounds
    python benchmarks/search_cold_start.py --data-dir /tmp/d --collection kb --rounds 9
    python benchmarks/search_cold_start.py --data-dir /tmp/d --against /path/to/main   # old vs new
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "sentence_transformers", "transformers", "dask", "distributed", "sqlalchemy", "pandas",
         "pyarrow", "chromadb", "onnxruntime")
MAN_PAGES = ("tar", "gzip", "ls", "cp", "find", "grep", "sed", "awk", "rsync", "ssh")
_PROBE = (
    "import runpy, sys, json\n"
    "sys.argv = ['embedfleet'] + sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module('embedfleet.cli', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))), file=sys.stderr)\n"
)


def _env(tree: Path) -> dict:
    path = os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def _man_corpus(target: Path) -> Path | None:
    """Ten man pages as plain text (capped at 60k characters each), or None without ``man``."""
    if shutil.which("man") is None:
        return None
    target.mkdir(parents=True)
    for page in MAN_PAGES:
        found = sorted(Path("/usr/share/man/man1").glob(f"{page}.1*"))
        if not found:
            continue
        done = subprocess.run(["man", "-l", str(found[0])], capture_output=True, env={**os.environ, "MANWIDTH": "100"},
                              check=False)
        text = done.stdout.decode(errors="replace")
        text = "".join(c for i, c in enumerate(text) if not (c == "\b" or (i + 1 < len(text) and text[i + 1] == "\b")))
        if text.strip():
            (target / f"{page}.txt").write_text(text[:60_000], encoding="utf-8")
    return target if any(target.iterdir()) else None


def _index(corpus: str, data_dir: Path, collection: str) -> dict:
    cmd = [sys.executable, "-m", "embedfleet.cli", "index", corpus, "--collection", collection, "--backend", "onnx",
           "--data-dir", str(data_dir), "--json"]
    done = subprocess.run(cmd, env=_env(HERE), cwd=HERE, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"indexing failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _run(tree: Path, args: list[str]) -> tuple[float, float, int, bytes]:
    """One fresh ``embedfleet search`` process: wall s, CPU s (user + sys), peak RSS bytes, stdout."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        # cwd: ``python -m`` puts the working directory first on sys.path, before PYTHONPATH.
        proc = subprocess.Popen([sys.executable, "-m", "embedfleet.cli", "search", *args], env=_env(tree),
                                cwd=tree, stdout=subprocess.PIPE, stderr=err)
        stdout = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own rusage, not all children's
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"search failed ({tree}):\n{err.read().decode(errors='replace')[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, stdout


def _imports(tree: Path, args: list[str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, "search", *args], env=_env(tree), cwd=tree,
                          capture_output=True, text=True, check=False)
    return json.loads(done.stderr.strip().splitlines()[-1]) if done.returncode == 0 else ["<failed>"]


def _summary(walls: list[float], cpus: list[float]) -> dict:
    return {
        "wall_median_s": round(statistics.median(walls), 3),
        "wall_min_s": round(min(walls), 3),
        "wall_max_s": round(max(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
        "walls_s": [round(w, 3) for w in walls],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="an existing data dir with the collection (default: make one)")
    parser.add_argument("--collection", default="kb")
    parser.add_argument("--corpus", help="folder to index when no --data-dir (default: man pages, else python-docs)")
    parser.add_argument("--query", default="how do I exclude files from an archive")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7, help="fresh processes per tree (median of these)")
    parser.add_argument("--against", help="another embedfleet checkout to interleave with this one (old vs new)")
    parser.add_argument("--target", type=float, default=1.5, help="wall seconds the median should stay under")
    args = parser.parse_args()

    out: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    scratch = None
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="embedfleet-search-bench-"))
        data_dir = scratch / "data"
        corpus = args.corpus or _man_corpus(scratch / "corpus") or "python-docs"
        result = _index(str(corpus), data_dir, args.collection)
        out["indexed"] = {"corpus": str(corpus), "chunks": result["chunks"], "documents": result["documents"]}
    try:
        search_args = [args.query, "--collection", args.collection, "-k", str(args.k), "--data-dir", str(data_dir)]
        trees = {"this": HERE}
        if args.against:
            trees["against"] = Path(args.against).resolve()
        for tree in trees.values():  # warm the page cache and the .pyc files; not timed
            _run(tree, search_args)
        walls: dict[str, list[float]] = {name: [] for name in trees}
        cpus: dict[str, list[float]] = {name: [] for name in trees}
        outputs: dict[str, set[str]] = {name: set() for name in trees}
        peak: dict[str, list[int]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                wall, cpu, rss, stdout = _run(tree, search_args)
                walls[name].append(wall)
                cpus[name].append(cpu)
                outputs[name].add(hashlib.sha256(stdout).hexdigest())
                peak[name].append(rss)
        for name, tree in trees.items():
            out[name] = {"tree": str(tree), **_summary(walls[name], cpus[name]),
                         "peak_rss_mb_median": int(statistics.median(peak[name])) >> 20,
                         "heavy_imports": _imports(tree, search_args), "distinct_outputs": len(outputs[name])}
        if "against" in trees:
            out["same_output"] = outputs["this"] == outputs["against"] and len(outputs["this"]) == 1
            out["speedup_median"] = round(out["against"]["wall_median_s"] / out["this"]["wall_median_s"], 2)
        out["load_after"] = os.getloadavg()
        out["target_wall_s"] = args.target
        out["target_met"] = out["this"]["wall_median_s"] < args.target
        print(json.dumps(out, indent=2))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
