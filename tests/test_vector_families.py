"""One vector family per collection unless --allow-mixed, and the int8 quality report (issue 20).

Through the real pipeline on the session cluster and real stores (embedded Chroma, Parquet):
the family guard with the fake embedder (the model does not matter to it), the quality report
with the real packaged model's ONNX int8 export, measured on the job's own chunks.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from embedfleet.cli import main
from embedfleet.errors import CollectionMismatch
from embedfleet.pipeline.run import run_job
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.sinks.base import CollectionInfo, QualityReport
from embedfleet.sinks.catalog import describe_user_collection, open_user_collection
from embedfleet.sinks.registry import open_sink
from embedfleet.tasks.quality import SAMPLE, sample_rows
from tests.conftest import FAKE_DIMENSIONS

CHUNKING = dict(chunk_size=48, chunk_overlap=8)


def _uri(kind: str, root) -> str:
    return f"chroma://{root}/chroma" if kind == "chroma" else f"parquet://{root}/parquet"


def _described(uri: str, collection: str = "kb") -> dict:
    with open_sink(uri) as sink:
        return describe_user_collection(sink, "local", collection)


# --------------------------------------------------------------------------- the family guard


@pytest.mark.parametrize("kind", ["chroma", "parquet"])
def test_another_family_is_refused_until_allow_mixed(kind, client, fake_model, docs_dir, data_dir):
    uri = _uri(kind, data_dir)
    # A collection an int8 job made (the fake model cannot quantize; the guard reads only the record).
    int8 = CollectionInfo(model="fake", dimensions=FAKE_DIMENSIONS, precision="int8", backend="onnx")
    with open_sink(uri) as sink:
        open_user_collection(sink, "local", "kb", info=int8, create=True)

    spec = build_job_spec(str(docs_dir), collection="kb", model="fake", sink=uri, data_dir=str(data_dir), **CHUNKING)
    with pytest.raises(CollectionMismatch) as refused:
        run_job(spec, client=client)
    message = str(refused.value)
    assert "\n" not in message
    assert "holds int8-onnx vectors" in message and "embeds float (fp32 on fake)" in message and "--allow-mixed" in message
    described = _described(uri)
    assert described["count"] == 0 and described["families"] == ["int8-onnx"] and described["mixed"] is False

    mixed = build_job_spec(str(docs_dir), collection="kb", model="fake", sink=uri, data_dir=str(data_dir),
                           allow_mixed=True, **CHUNKING)
    result = run_job(mixed, client=client)
    assert result.status == "succeeded" and result.embedded > 0
    assert result.quality is None  # nothing quantized, nothing measured
    described = _described(uri)
    assert described["count"] == result.chunks
    assert described["families"] == ["int8-onnx", "float"] and described["mixed"] is True
    # The creator's record stands; the mix is added to it.
    assert (described["precision"], described["backend"]) == ("int8", "onnx")

    # Listed as mixed by the CLI (text and JSON).
    listed = CliRunner().invoke(main, ["collections", "list", "--sink", uri, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["collections"][0]["mixed"] is True
    text = CliRunner().invoke(main, ["collections", "list", "--sink", uri])
    assert "int8-onnx+float) MIXED" in text.stdout


def test_allow_mixed_is_a_cli_flag_and_one_family_needs_none(client, fake_model, docs_dir, data_dir):
    uri = _uri("parquet", data_dir)
    args = ["index", str(docs_dir), "--model", "fake", "--collection", "kb", "--sink", uri, "--data-dir", str(data_dir),
            "--scheduler", client.scheduler.address, "--chunk-size", "48", "--chunk-overlap", "8", "--json"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["quality"] is None
    # A float job of another precision joins the float collection without --allow-mixed.
    again = CliRunner().invoke(main, [*args, "--precision", "auto", "--mode", "full"])
    assert again.exit_code == 0, again.output
    assert _described(uri)["families"] == ["float"]
    assert "--allow-mixed" in CliRunner().invoke(main, ["index", "--help"]).output


def test_sample_rows_spreads_over_files():
    picked = sample_rows([3, 0, 5, 2], 4)
    assert sum(len(rows) for rows in picked.values()) == 4
    assert set(picked) <= {0, 2, 3} and picked[0][0] == 0 and picked[3][-1] == 1  # first row and last row
    assert sample_rows([2, 1], 10) == {0: [0, 1], 1: [0]}  # fewer rows than asked: all of them
    assert sample_rows([], 10) == {}


# --------------------------------------------------------------------------- the int8 report, real model


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """One data dir for the module, so the model is exported and quantized once."""
    return tmp_path_factory.mktemp("int8-data")


@pytest.fixture(scope="module")
def help_docs(tmp_path_factory):
    """Python's help topics as text files: real prose and code, ~300 chunks of 48 tokens."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("help-docs")
    for name in sorted(topics)[:40]:
        (root / f"{name}.txt").write_text(topics[name][:1500], encoding="utf-8")
    return root


def _check_report(report: dict, *, job_id: str, chunks: int) -> None:
    assert report["family"] == "int8-onnx" and report["job_id"] == job_id
    assert report["samples"] == min(SAMPLE, chunks)
    assert 0.8 < report["min_cosine"] <= report["mean_cosine"] < 1.0
    assert 0.5 < report["top10_overlap"] <= 1.0


@pytest.mark.slow
def test_int8_job_measures_on_its_chunks_and_stores_the_report(client, help_docs, shared_data):
    uri = _uri("chroma", shared_data)
    args = ["index", str(help_docs), "--collection", "kb", "--sink", uri, "--data-dir", str(shared_data), "--scheduler",
            client.scheduler.address, "--backend", "onnx", "--quantize", "int8", *("--chunk-size", "48")]
    ran = CliRunner().invoke(main, [*args, "--json"])
    assert ran.exit_code == 0, ran.output
    result = json.loads(ran.stdout)
    assert result["precision"] == "int8" and result["chunks"] > SAMPLE
    _check_report(result["quality"], job_id=result["job_id"], chunks=result["chunks"])

    described = _described(uri)
    assert described["quality"] == result["quality"] and described["families"] == ["int8-onnx"]
    # collections info shows it, as text and over the same code path as GET /v1/collections.
    info = CliRunner().invoke(main, ["collections", "info", "kb", "--sink", uri])
    assert "quality:" in info.stdout and "top-10 neighbour overlap" in info.stdout and result["job_id"] in info.stdout

    # An unquantized job of the same model is another family: refused in one line, nothing written.
    fp32 = CliRunner().invoke(main, [a for a in args if a not in ("--quantize", "int8")] + ["--mode", "full"])
    assert fp32.exit_code != 0
    assert "--allow-mixed" in fp32.output and "int8-onnx" in fp32.output
    assert _described(uri)["quality"] == result["quality"]

    # A small edit embeds fewer chunks than the sample: the stored report stands, and is printed.
    (help_docs / "assert.txt").write_text("assert statements check invariants while debugging.\n", encoding="utf-8")
    small = CliRunner().invoke(main, [*args, "--json"])
    assert small.exit_code == 0, small.output
    small_result = json.loads(small.stdout)
    assert 0 < small_result["embedded"] < SAMPLE and small_result["quality"] == result["quality"]
    assert _described(uri)["quality"] == result["quality"]
    # A run that embeds the sample's worth measures again; `embedfleet index` prints the report.
    text = CliRunner().invoke(main, [*args, "--mode", "full"])
    assert text.exit_code == 0, text.output
    assert "int8-onnx: cosine to fp32 on" in text.stdout and "top-10 neighbour overlap" in text.stdout
    latest = _described(uri)["quality"]
    assert latest["job_id"] != result["job_id"] and latest["job_id"] in text.stdout


@pytest.mark.slow
def test_int8_report_in_a_parquet_collection(client, help_docs, shared_data):
    uri = _uri("parquet", shared_data)
    spec = build_job_spec(str(help_docs), collection="kb", sink=uri, data_dir=str(shared_data), backend="onnx",
                          quantize="int8", chunk_size=48)
    result = run_job(spec, client=client)
    assert result.status == "succeeded"
    _check_report(result.quality, job_id=spec.job_id, chunks=result.chunks)
    # The Parquet sink's own record (what pandas users find next to the part files).
    collection_dir = next((shared_data / "parquet").iterdir())
    recorded = json.loads((collection_dir / "_collection.json").read_text())["info"]
    assert recorded["embedfleet_families"] == "int8-onnx"
    assert QualityReport.from_dict(json.loads(recorded["embedfleet_quality"])).to_dict() == result.quality
