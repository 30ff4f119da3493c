"""Config: defaults, schema validation, environment overrides, frozen specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask.config
import pytest
from click.testing import CliRunner

from embedfleet import config
from embedfleet.cli import main
from embedfleet.errors import ChunkingError, ConfigError, UnknownBackendError


def test_defaults_are_loaded_and_valid():
    config.validate()
    assert config.get("chunk.unit") == "tokens"
    assert config.get("jobs.tiers.premium.daily-chunks") == 10000
    assert config.model_spec().dimensions == 384


def test_every_default_key_has_a_comment():
    text = open(os.path.join(os.path.dirname(config.__file__), "embedfleet.yaml")).read()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in line or stripped.startswith(("free:", "premium:", "enterprise:", "unlimited:")), line


def test_environment_variable_overrides_in_a_fresh_process():
    env = {**os.environ, "DASK_EMBEDFLEET__EMBED__BATCH_TOKENS": "1234", "DASK_EMBEDFLEET__CHUNK__UNIT": "words"}
    out = subprocess.run(
        [sys.executable, "-c",
         "import embedfleet; from embedfleet import config; "
         "print(config.embedder_spec().batch_tokens, config.chunk_spec().unit)"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.split() == ["1234", "words"]


def test_schema_rejects_a_bad_value():
    with dask.config.set({"embedfleet.chunk.unit": "sentences"}):
        with pytest.raises(ConfigError, match="chunk.unit"):
            config.validate()


def test_chunk_spec_validation():
    with pytest.raises(ChunkingError, match="smaller than the size"):
        config.ChunkSpec(unit="tokens", size=10, overlap=10)
    with pytest.raises(ChunkingError):
        config.ChunkSpec(unit="lines", size=10, overlap=1)


def test_unknown_model_and_backend_list_the_known_ones():
    with pytest.raises(ConfigError, match="minilm"):
        config.model_spec("nope")
    from embedfleet.embedders.registry import check_backend

    with pytest.raises(UnknownBackendError, match="sentence-transformers"):
        check_backend("tensorflow")


def test_specs_are_frozen_and_hashable():
    spec = config.embedder_spec()
    assert hash(spec) == hash(config.embedder_spec())
    with pytest.raises(Exception):
        spec.batch_tokens = 1  # type: ignore[misc]


def test_config_show_json():
    result = CliRunner().invoke(main, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["embedfleet"]["chunk"]["size"] == 200


def test_unexpected_errors_are_one_line_unless_verbose(monkeypatch):
    import embedfleet.api

    def boom(*args, **kwargs):
        raise ValueError("parquet footer is corrupt")

    monkeypatch.setattr(embedfleet.api, "search", boom)
    monkeypatch.setattr(embedfleet, "search", boom)
    quiet = CliRunner().invoke(main, ["search", "anything"])
    assert quiet.exit_code == 1
    assert quiet.output.strip() == "Error: unexpected ValueError: parquet footer is corrupt (run with -v for the traceback)"
    loud = CliRunner().invoke(main, ["-v", "search", "anything"])
    assert isinstance(loud.exception, ValueError)
