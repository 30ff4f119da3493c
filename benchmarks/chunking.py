"""Chunk quality and chunking speed, today's chunker against the one it replaced; prints JSON.

For each corpus — the built-in python-docs, and a folder of man pages rendered as text with
``man -P cat`` (from /usr/share/man; skipped, saying so, where there are none) — the documents
are read with embedfleet's own readers and chunked with the default model's tokenizer, both
by ``embedfleet.tasks.chunking.chunk_partition`` and by the chunker before issue 21 (the
module as it was in git, loaded from ``git show`` into a temporary module: the package keeps
no second chunker). Reported per chunker:

* ``mid_word_starts`` / ``mid_word_ends``: the share of chunks starting / ending inside a word
  (an ``\\S+`` run), and ``forced_mid_word``: of those cuts, how many are in a word that alone
  is over the budget, where a cut is unavoidable;
* ``length``: chunk tokens as a share of the budget ``min(size, max_tokens)``: mean, p10 and
  median, over every chunk and over chunks that are not their document's last (a last chunk is
  only as long as what is left);
* ``seconds`` and ``cpu_seconds`` (each the best of ``--repeat`` interleaved runs),
  ``chars_per_second``; and ``speed_vs_old`` / ``cpu_speed_vs_old``, today's throughput over
  the old one's by wall-clock and by CPU time (aim >= 0.8).

Usage::

    python benchmarks/chunking.py                    # 200-token chunks, overlap 32, 60 man pages
    python benchmarks/chunking.py --size 128 --overlap 16 --man-pages 120 --repeat 5
    python benchmarks/chunking.py --man-dir ./man-txt --baseline-rev 753ee7e
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
OLD_PATH = "embedfleet/tasks/chunking.py"


def old_chunker(rev: str | None, workdir: Path):
    """The single-module chunker as it was before issue 21, imported from git."""
    if rev is None:
        # The commit that turned tasks/chunking.py into a package: its parent has the old module.
        deleted = subprocess.run(
            ["git", "log", "--diff-filter=D", "-1", "--format=%H", "--", OLD_PATH],
            cwd=REPO, check=True, capture_output=True, text=True,
        ).stdout.strip()
        if not deleted:
            raise SystemExit(f"no commit deletes {OLD_PATH}: pass --baseline-rev")
        rev = f"{deleted}^"
    source = subprocess.run(["git", "show", f"{rev}:{OLD_PATH}"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    path = workdir / "embedfleet_old_chunking.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("embedfleet_old_chunking", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return rev, module


def man_pages(out: Path, count: int) -> tuple[Path | None, str]:
    """``count`` man pages of section 1, evenly spread over the installed ones, as text files."""
    pages = sorted(Path("/usr/share/man/man1").glob("*.1*")) if Path("/usr/share/man/man1").is_dir() else []
    if not pages or shutil.which("man") is None:
        return None, "no man pages here (/usr/share/man/man1 or man(1) missing): corpus skipped"
    step = max(1, len(pages) // count)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""}
    made = 0
    for page in pages[::step][:count]:
        run = subprocess.run(["man", "-P", "cat", "-l", str(page)], check=False, capture_output=True, env=env, timeout=60)
        text = run.stdout.decode("utf-8", "replace")
        text = re.sub(r".\x08", "", text)  # overstrike bold/underline, where groff still emits it
        if run.returncode == 0 and text.strip():
            name = page.name.removesuffix(".gz")
            (out / f"{name}.txt").write_text(text)
            made += 1
    return out, f"{made} pages of /usr/share/man/man1 rendered with man -P cat (MANWIDTH=80)"


def read_corpus(source: str):
    from embedfleet.datasets import plan_partitions, read_partition, source_spec

    spec = source_spec(source)
    return [read_partition(spec, part) for part in plan_partitions(spec)]


def in_word(text: str, p: int) -> bool:
    return 0 < p < len(text) and not text[p - 1].isspace() and not text[p].isspace()


def word_tokens(text: str, p: int, tokenizer) -> int:
    a = p
    while a > 0 and not text[a - 1].isspace():
        a -= 1
    z = p
    while z < len(text) and not text[z].isspace():
        z += 1
    return len(tokenizer.encode(text[a:z], add_special_tokens=False).ids)


def quality(partitions, tables, *, budget: int, tokenizer) -> dict:
    starts = ends = forced = total = 0
    shares, inner = [], []
    for documents, table in zip(partitions, tables):
        texts = dict(zip(documents.column("doc_id").to_pylist(), documents.column("text").to_pylist()))
        rows = table.select(["doc_id", "start", "end", "n_tokens"]).to_pylist()
        for k, row in enumerate(rows):
            text = texts[row["doc_id"]]
            total += 1
            share = row["n_tokens"] / budget
            shares.append(share)
            if k + 1 < len(rows) and rows[k + 1]["doc_id"] == row["doc_id"]:
                inner.append(share)
            for p, is_start in ((row["start"], True), (row["end"], False)):
                if in_word(text, p):
                    starts += is_start
                    ends += not is_start
                    forced += word_tokens(text, p, tokenizer) > budget
    return {
        "chunks": total,
        "mid_word_starts": round(starts / max(total, 1), 4),
        "mid_word_ends": round(ends / max(total, 1), 4),
        "mid_word_cuts": starts + ends,
        "forced_mid_word": forced,
        "length": {"all": summary(shares), "not_last": summary(inner)},
    }


def summary(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
    return {"mean": round(sum(values) / len(values), 3), "p10": pick(0.10), "p50": pick(0.50), "n": len(values)}


def bench(name: str, source: str, note: str, *, old, args, model_path: str, max_tokens: int, tokenizer) -> dict:
    from embedfleet.tasks.chunking import chunk_partition

    partitions = read_corpus(source)
    chars = sum(sum(map(len, p.column("text").to_pylist())) for p in partitions)
    kwargs = {"unit": "tokens", "size": args.size, "overlap": args.overlap, "model_path": model_path, "max_tokens": max_tokens}
    runs = {"old": lambda p: old.chunk_partition(p, **kwargs), "new": lambda p: chunk_partition(p, **kwargs)}
    best = {k: float("inf") for k in runs}
    cpu = {k: float("inf") for k in runs}
    out = {}
    for _ in range(args.repeat):
        for key, run in runs.items():  # interleaved, so drift on a shared machine hits both
            t0, c0 = time.perf_counter(), time.process_time()
            out[key] = [run(p) for p in partitions]
            best[key] = min(best[key], time.perf_counter() - t0)
            cpu[key] = min(cpu[key], time.process_time() - c0)
    budget = min(args.size, max_tokens)
    result = {"corpus": name, "source": note, "documents": sum(p.num_rows for p in partitions), "chars": chars}
    for key in runs:
        result[key] = {
            **quality(partitions, out[key], budget=budget, tokenizer=tokenizer),
            "seconds": round(best[key], 3),
            "cpu_seconds": round(cpu[key], 3),
            "chars_per_second": round(chars / best[key]),
        }
    result["speed_vs_old"] = round(best["old"] / best["new"], 3)
    # CPU time (all threads, the tokenizer's too) is less disturbed by other processes' load.
    result["cpu_speed_vs_old"] = round(cpu["old"] / cpu["new"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--man-pages", type=int, default=60)
    parser.add_argument("--man-dir", help="a folder of man pages as text instead of rendering them")
    parser.add_argument("--baseline-rev", help="the git revision whose tasks/chunking.py is the old chunker")
    args = parser.parse_args()

    from embedfleet import config
    from embedfleet.tasks.chunking import load_tokenizer, reserved_tokens

    model = config.model_spec()
    model_path = config.resolve_model_path(model.path)
    max_tokens = model.max_seq_length - reserved_tokens(model_path, prefix=model.document_prefix)
    tokenizer = load_tokenizer(model_path)
    with tempfile.TemporaryDirectory(prefix="embedfleet-chunk-bench-") as tmp:
        rev, old = old_chunker(args.baseline_rev, Path(tmp))
        corpora = [("python-docs", "builtin:python-docs", "the built-in python-docs dataset")]
        if args.man_dir:
            corpora.append(("man-pages", args.man_dir, f"man pages from {args.man_dir}"))
            skipped = None
        else:
            folder, skipped = man_pages(Path(tmp) / "man", args.man_pages)
            if folder is not None:
                corpora.append(("man-pages", str(folder), skipped))
                skipped = None
        results = [
            bench(name, source, note, old=old, args=args, model_path=model_path, max_tokens=max_tokens, tokenizer=tokenizer)
            for name, source, note in corpora
        ]
    print(json.dumps({
        "size": args.size, "overlap": args.overlap, "max_tokens": max_tokens, "model": model.name,
        "baseline": f"{OLD_PATH} at {rev}", "skipped": skipped, "corpora": results,
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
