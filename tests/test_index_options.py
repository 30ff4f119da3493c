"""One definition of a job's options: every :class:`IndexOptions` field is taken by every entry
point (``embedfleet index``, ``embedfleet jobs submit``, ``embedfleet.index``,
``JobService.submit``, a cron schedule) and reaches the job's spec; a bad value is refused by
each with one clear error before anything is recorded."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import types

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session

import embedfleet
import embedfleet.pipeline.spec
from embedfleet.cli import main
from embedfleet.errors import ConfigError, ScheduleError
from embedfleet.options import IndexOptions
from embedfleet.pipeline.job import JobSpec
from embedfleet.pipeline.spec import build_job_spec
from embedfleet.schedulers.cron import CronScheduler
from embedfleet.schedulers.schedules import load_schedules
from embedfleet.schedulers.models import Job
from embedfleet.schedulers.service import JobService

UTC = dt.timezone.utc
FIELDS = [f.name for f in IndexOptions.fields()]
KEYS = {f.name: f.key for f in IndexOptions.fields()}

# field -> (a value other than the default, the fields that value needs, where the spec holds it).
# A field added to IndexOptions without a row here fails every test below.
SAMPLES = {
    "collection": ("kb2", {}, lambda s: s.collection),
    "sink": ("parquet:///tmp/embedfleet-options-test", {}, lambda s: s.sink.uri),
    "model": ("fake", {}, lambda s: s.embedder.model.name),
    "chunk_size": (64, {}, lambda s: s.chunk.size),
    "chunk_overlap": (8, {}, lambda s: s.chunk.overlap),
    "chunk_unit": ("words", {}, lambda s: s.chunk.unit),
    "chunk_structure": ("none", {}, lambda s: s.chunk.structure),
    "chunk_heading_context": (True, {}, lambda s: s.chunk.heading_context),
    "mode": ("full", {}, lambda s: s.mode),
    "on_error": ("fail", {}, lambda s: s.on_error),
    "text_column": ("body", {}, lambda s: s.source.text_column),
    "id_column": ("url", {}, lambda s: s.source.id_column),
    "precision": ("bf16", {}, lambda s: s.embedder.precision),
    "backend": ("onnx", {}, lambda s: s.embedder.backend),
    "batch_tokens": (1024, {}, lambda s: s.embedder.batch_tokens),
    "quantize": ("int8", {"backend": "onnx"}, lambda s: s.embedder.quantize),
    "allow_mass_delete": (True, {}, lambda s: s.allow_mass_delete),
    "allow_mixed": (True, {}, lambda s: s.allow_mixed),
}

# (field, bad value, what the message says)
INVALID = [
    ("mode", "fast", "mode must be one of sync, append, full, not 'fast'"),
    ("chunk_size", 0, "chunk-size must be at least 1, not 0"),
    ("quantize", "int4", "quantize must be int8, not 'int4'"),
    ("sink", "", "sink must be a non-empty string"),
    ("allow_mass_delete", "yes", "allow-mass-delete must be true or false, not 'yes'"),
]
# On the command line click checks types and choices itself, and a flag takes no value.
CLI_INVALID = [
    ("mode", "fast", "Invalid value for '--mode': 'fast' is not one of 'sync', 'append', 'full'"),
    ("chunk_size", 0, "Invalid value for '--chunk-size': 0 is not in the range x>=1"),
    ("quantize", "int4", "Invalid value for '--quantize'"),
    ("sink", "", "sink must be a non-empty string"),
]


class Stop(Exception):
    """Ends an inline run once its spec is built: these tests are about options, not running."""


class Recorder:
    """The real build_job_spec, keeping each spec it builds."""

    def __init__(self, *, stop: bool = False):
        self.specs: list[JobSpec] = []
        self.stop = stop

    def __call__(self, source, options, **kwargs) -> JobSpec:
        spec = build_job_spec(source, options, **kwargs)
        self.specs.append(spec)
        if self.stop:
            raise Stop
        return spec

    def only(self) -> JobSpec:
        [spec] = self.specs
        return spec


@pytest.fixture(autouse=True)
def _fake(fake_model):
    return fake_model


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"url": f"u{i}", "text": f"text {i}", "body": f"body of document {i}"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def where(tmp_path):
    return types.SimpleNamespace(url=f"sqlite:///{tmp_path / 'jobs.db'}", data_dir=str(tmp_path / "data"))


@contextlib.contextmanager
def no_cluster(**_):
    yield types.SimpleNamespace(dashboard_link="-")


def sample(name: str) -> dict:
    value, needs, _ = SAMPLES[name]
    return {**needs, name: value}


def assert_reached(spec: JobSpec, name: str) -> None:
    value, _, held = SAMPLES[name]
    assert held(spec) == value
    # The other fields kept their defaults: an option reaches its own place only.
    assert spec.mode == ("full" if name == "mode" else "sync")


def cli_args(fields: dict) -> list[str]:
    args = []
    for name, value in fields.items():
        if value is True:
            args.append(f"--{KEYS[name]}")
        else:
            args += [f"--{KEYS[name]}", str(value)]
    return args


def schedule_file(tmp_path, corpus, fields: dict):
    top = {k: v for k, v in fields.items() if k in ("collection", "sink", "mode")}
    nested = {KEYS[k]: v for k, v in fields.items() if k not in top}
    lines = ["schedules:", "  - name: opts", "    cron: '0 * * * *'", f"    source: {corpus}", "    user: alice"]
    lines += [f"    {k}: {json.dumps(v)}" for k, v in top.items()]
    if nested:
        lines += ["    options:", *(f"      {k}: {json.dumps(v)}" for k, v in nested.items())]
    path = tmp_path / "schedules.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def stored_spec(where, job_id: str) -> JobSpec:
    with JobService(where.url, data_dir=where.data_dir) as service, Session(service.engine) as session:
        return JobSpec.from_json(session.get(Job, job_id).spec)


def test_every_field_is_described_for_the_interfaces_built_from_it():
    assert sorted(SAMPLES) == sorted(FIELDS)
    for field in IndexOptions.fields():
        assert field.kind in (str, int, bool) and field.help.endswith(".")
        assert field.default is (False if field.kind is bool else None)  # None: from config
    choices = {f.name: f.choices for f in IndexOptions.fields() if f.choices}
    assert choices == {
        "chunk_unit": ("tokens", "words", "chars"),
        "chunk_structure": ("auto", "none"),
        "mode": ("sync", "append", "full"),
        "on_error": ("skip", "fail"),
        "precision": ("fp32", "bf16", "fp16", "auto"),
        "quantize": ("int8",),
    }


# --------------------------------------------------------------------------------------------
# every field, every entry point


@pytest.mark.parametrize("name", FIELDS)
def test_embedfleet_index_cli_takes_it(name, corpus, where, monkeypatch):
    recorder = Recorder(stop=True)
    monkeypatch.setattr(embedfleet.pipeline.spec, "build_job_spec", recorder)
    # No cluster: the run stops once its spec is built.
    monkeypatch.setattr("embedfleet.pipeline.cluster.connect", no_cluster)
    result = CliRunner().invoke(main, ["index", str(corpus), *cli_args(sample(name)), "--db", where.url,
                                       "--data-dir", where.data_dir])
    assert "unexpected Stop" in result.stderr, result.output
    assert_reached(recorder.only(), name)


@pytest.mark.parametrize("name", FIELDS)
def test_jobs_submit_cli_takes_it(name, corpus, where, monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(embedfleet.pipeline.spec, "build_job_spec", recorder)
    result = CliRunner().invoke(main, ["jobs", "submit", str(corpus), "--user", "alice", *cli_args(sample(name)),
                                       "--db", where.url, "--data-dir", where.data_dir, "--json"])
    assert result.exit_code == 0, result.output
    assert_reached(recorder.only(), name)
    assert_reached(stored_spec(where, json.loads(result.stdout)["id"]), name)


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("form", ["keywords", "options"])
def test_the_python_api_takes_it(name, form, corpus, where, monkeypatch):
    recorder = Recorder(stop=True)
    monkeypatch.setattr(embedfleet.pipeline.spec, "build_job_spec", recorder)
    fields = sample(name)
    given = fields if form == "keywords" else {"options": IndexOptions(**fields)}
    with pytest.raises(Stop):
        embedfleet.index(str(corpus), client="no cluster needed", data_dir=where.data_dir, database_url=where.url, **given)
    assert_reached(recorder.only(), name)


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("form", ["keywords", "options"])
def test_job_service_submit_takes_it(name, form, corpus, where):
    recorder = Recorder()
    fields = sample(name)
    given = fields if form == "keywords" else {"options": IndexOptions(**fields)}
    with JobService(where.url, data_dir=where.data_dir, spec_builder=recorder, estimator=lambda s, c: 1) as service:
        job = service.submit(str(corpus), user="alice", **given)
    assert_reached(recorder.only(), name)
    stored = stored_spec(where, job.id)
    assert stored.to_json() == recorder.only().to_json()  # the record resumes as the same job


@pytest.mark.parametrize("name", FIELDS)
def test_a_cron_schedule_takes_it(name, corpus, where, tmp_path):
    recorder = Recorder()
    path = schedule_file(tmp_path, corpus, sample(name))
    with JobService(where.url, data_dir=where.data_dir, spec_builder=recorder, estimator=lambda s, c: 1) as service:
        cron = CronScheduler(service, path)
        start = dt.datetime(2026, 3, 2, 12, 0, 30, tzinfo=UTC)
        assert cron.tick(start) == []  # first sight: the next slot fires
        [fired] = cron.tick(start + dt.timedelta(hours=1))
    assert fired.outcome == "submitted", fired.message
    assert_reached(recorder.only(), name)
    assert_reached(stored_spec(where, fired.job_id), name)


# --------------------------------------------------------------------------------------------
# a bad value, every entry point


def _nothing_recorded(where) -> bool:
    with JobService(where.url, data_dir=where.data_dir) as service:
        return service.list(user="alice") == [] and service.list(user="local") == []


@pytest.mark.parametrize("name,value,message", INVALID, ids=[i[0] for i in INVALID])
def test_a_bad_value_is_one_config_error_from_the_python_api(name, value, message, corpus, where):
    with pytest.raises(ConfigError) as err:
        embedfleet.index(str(corpus), client="unused", data_dir=where.data_dir, database_url=where.url, **{name: value})
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=message):
        IndexOptions(**{name: value})


@pytest.mark.parametrize("name,value,message", INVALID, ids=[i[0] for i in INVALID])
def test_a_bad_value_is_one_config_error_from_the_job_service(name, value, message, corpus, where):
    recorder = Recorder()
    with JobService(where.url, data_dir=where.data_dir, spec_builder=recorder, estimator=lambda s, c: 1) as service:
        with pytest.raises(ConfigError) as err:
            service.submit(str(corpus), user="alice", **{name: value})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert recorder.specs == [] and _nothing_recorded(where)


@pytest.mark.parametrize("name,value,message", INVALID, ids=[i[0] for i in INVALID])
def test_a_bad_value_in_a_schedule_names_its_line(name, value, message, corpus, tmp_path):
    path = schedule_file(tmp_path, corpus, {name: value})
    with pytest.raises(ScheduleError) as err:
        load_schedules(path)
    assert err.value.line == 6 + (name not in ("collection", "sink", "mode"))
    words = "must be a non-empty string" if name == "sink" else message.split(" ", 1)[1]
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("command", [["index"], ["jobs", "submit"]])
@pytest.mark.parametrize("name,value,message", CLI_INVALID, ids=[i[0] for i in CLI_INVALID])
def test_a_bad_value_is_one_error_line_from_the_cli(command, name, value, message, corpus, where):
    result = CliRunner().invoke(main, [*command, str(corpus), *cli_args({name: value}), "--db", where.url,
                                       "--data-dir", where.data_dir])
    assert result.exit_code == 2
    assert message in result.stderr and not result.stdout
    assert [line for line in result.stderr.splitlines() if line.startswith("Error")] == [
        next(line for line in result.stderr.splitlines() if message in line)
    ]


def test_an_unknown_keyword_is_refused_with_a_suggestion(corpus, where):
    with pytest.raises(ConfigError, match=r"unknown option 'chunksize' \(did you mean 'chunk_size'\?\)"):
        embedfleet.index(str(corpus), client="unused", data_dir=where.data_dir, chunksize=64)
    with JobService(where.url, data_dir=where.data_dir) as service:
        with pytest.raises(ConfigError, match="unknown option 'precison'"):
            service.submit(str(corpus), user="alice", precison="bf16")


def test_keywords_replace_the_options_they_name():
    base = IndexOptions(collection="kb", chunk_size=64)
    assert IndexOptions.merge(base, chunk_size=128) == IndexOptions(collection="kb", chunk_size=128)
    assert IndexOptions.merge(base) is base and IndexOptions.merge() == IndexOptions()
    with pytest.raises(TypeError, match="options must be an IndexOptions, not dict"):
        IndexOptions.merge({"collection": "kb"})
