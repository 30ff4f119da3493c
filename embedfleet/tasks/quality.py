"""The quality report of a quantized job, measured on a sample of the job's own chunks.

One task, on an embedding worker (where the job's model is loaded already): it picks up to
:data:`SAMPLE` chunks spread evenly over the job's chunk files (the whole source as chunked
now, not only what this run embeds, so a small incremental run is measured on its
collection's kind of text too), embeds them as the embed stage does (heading context
included) with the job's model and with its fp32 reference
(:func:`embedfleet.embedders.quality.measure`), and writes the report next to the job's
other outputs, so a resumed job does not measure again.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from embedfleet.config import EmbedderSpec
from embedfleet.frames.io import exists, parquet_rows, read_json, read_table, write_json_atomic
from embedfleet.frames.schemas import CHUNKS, check_schema

__all__ = ["SAMPLE", "quality_stage", "sample_rows"]

#: Chunks the report is measured on: enough for a stable minimum and a top-10 overlap over a
#: few hundred neighbours; small enough to cost seconds beside the job's own embedding.
SAMPLE = 256


def sample_rows(row_counts: list[int], n: int) -> dict[int, list[int]]:
    """Up to ``n`` rows spread evenly over files of ``row_counts`` rows: {file index: row indices}."""
    total = sum(row_counts)
    picks = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(np.int64)) if total else []
    starts = np.cumsum([0, *row_counts])
    out: dict[int, list[int]] = {}
    for pick in picks:
        i = int(np.searchsorted(starts, pick, side="right") - 1)
        out.setdefault(i, []).append(int(pick - starts[i]))
    return out


def quality_stage(chunk_paths: list[str], *, embedder: EmbedderSpec, heading_context: bool, out_path: str,
                  sample: int = SAMPLE) -> dict[str, Any]:
    from embedfleet.embedders.quality import measure

    if exists(out_path):  # measured by an earlier run of this job
        return read_json(out_path)
    picked = sample_rows([parquet_rows(p) for p in chunk_paths], sample)
    tables = [read_table(chunk_paths[i], schema=CHUNKS).take(pa.array(rows)) for i, rows in sorted(picked.items())]
    table = check_schema(pa.concat_tables(tables), CHUNKS, stage="quality sample")
    texts = table.column("text").to_pylist()
    if heading_context:
        from embedfleet.tasks.chunking.structure import embedding_texts

        texts = embedding_texts(texts, table.column("metadata").to_pylist())
    report = measure(embedder, texts, table.column("n_tokens").to_numpy())
    report["pid"] = os.getpid()
    write_json_atomic(report, out_path)
    return report
