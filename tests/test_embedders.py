"""Embedders without a cluster: token-budget batching, OOM halving, precision resolution, bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedfleet import config
from embedfleet.config import EmbedderSpec, ModelSpec
from embedfleet.embedders import hardware
from embedfleet.embedders.base import SPECIAL_TOKENS, BatchStats, plan_batches
from tests.fake_embedder import FakeEmbedder, fake_vector
from embedfleet.errors import ConfigError, EmbeddingError
from embedfleet.sinks.base import CollectionInfo
from tests.conftest import help_topic_chunks


def _spec(**kwargs) -> EmbedderSpec:
    model = ModelSpec(name="fake", path="unused", dimensions=8, backend="fake", max_seq_length=256)
    return EmbedderSpec(model=model, backend="fake", **kwargs)


# --------------------------------------------------------------------------- plan_batches


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=600), max_size=300), st.integers(min_value=1, max_value=20000))
def test_plan_batches_covers_every_text_once_within_budget(lengths, budget):
    batches = plan_batches(lengths, budget)
    flat = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    padded = np.asarray(lengths) + SPECIAL_TOKENS
    previous_shortest = None
    for k, batch in enumerate(batches):
        longest = padded[batch].max()
        # Within budget, except a single text that alone exceeds it.
        assert len(batch) * longest <= budget or len(batch) == 1
        # Greedy: one more text would have broken the budget (unless none was left).
        if k < len(batches) - 1:
            assert (len(batch) + 1) * longest > budget
        # Sorted longest first: no batch holds a text longer than any text of the batch before.
        if previous_shortest is not None:
            assert longest <= previous_shortest
        previous_shortest = padded[batch].min()


def test_plan_batches_groups_similar_lengths():
    # Interleaved short and long texts: sorting must keep them apart, so padding stays small.
    lengths = [10, 250, 12, 240, 11, 245, 9, 248] * 16
    batches = plan_batches(lengths, 2048)
    padded = np.asarray(lengths) + SPECIAL_TOKENS
    real = padded.sum()
    padded_total = sum(len(b) * padded[b].max() for b in batches)
    assert real / padded_total > 0.9
    assert plan_batches([], 100) == []


def test_plan_batches_is_fast_on_a_big_partition():
    import time

    lengths = np.random.default_rng(0).integers(1, 255, size=100_000)
    started = time.perf_counter()
    batches = plan_batches(lengths, 8192)
    assert time.perf_counter() - started < 1.0
    assert sum(len(b) for b in batches) == 100_000


def test_embed_with_stats_reports_padding_and_keeps_order():
    embedder = FakeEmbedder(_spec(batch_tokens=64))
    texts = [f"text {i} " + "word " * (i % 7) for i in range(50)]
    n_tokens = [2 + i % 7 for i in range(50)]
    vectors, stats = embedder.embed_with_stats(texts, n_tokens)
    expected = np.stack([fake_vector(t, 8) for t in texts])
    np.testing.assert_allclose(vectors, expected, atol=1e-6)  # output rows follow input order
    assert stats.texts == 50 and stats.batches > 1
    assert stats.real_tokens == sum(n + SPECIAL_TOKENS for n in n_tokens)
    assert 0 < stats.padding_efficiency <= 1
    assert stats.batch_tokens == 64
    # The per-call budget overrides the spec's.
    _, bigger = embedder.embed_with_stats(texts, n_tokens, batch_tokens=10_000)
    assert bigger.batches == 1


def test_document_prefix_counts_toward_the_budget():
    model = ModelSpec(name="fake", path="unused", dimensions=8, backend="fake", document_prefix="passage: ")
    embedder = FakeEmbedder(EmbedderSpec(model=model, backend="fake", batch_tokens=100))
    seen: list[list[str]] = []
    original = embedder._encode

    def spy(texts):
        seen.append(texts)
        return original(texts)

    embedder._encode = spy
    _, stats = embedder.embed_with_stats(["a"] * 10, [8] * 10)
    prefix_tokens = embedder.count_tokens(["passage: "])[0]
    per_text = 8 + prefix_tokens + SPECIAL_TOKENS
    assert all(t.startswith("passage: ") for batch in seen for t in batch)
    assert max(len(b) for b in seen) == 100 // per_text
    assert stats.real_tokens == 10 * per_text


def test_batch_stats_add():
    total = BatchStats()
    total.add(BatchStats(texts=2, real_tokens=10, padded_tokens=12, batches=1, seconds=0.5, oom_retries=1))
    total.add(BatchStats(texts=3, real_tokens=20, padded_tokens=20, batches=2, seconds=0.5))
    assert (total.texts, total.real_tokens, total.padded_tokens, total.batches, total.oom_retries) == (5, 30, 32, 3, 1)
    assert total.padding_efficiency == pytest.approx(30 / 32)


# --------------------------------------------------------------------------- out of memory


class _OomFake(FakeEmbedder):
    """Raises the torch backend's own OOM type above a padded-token limit, like a full GPU."""

    limit = 300
    calls: list[int]

    @classmethod
    def oom_error_types(cls):
        from embedfleet.embedders.sentence_transformers import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder.oom_error_types()

    def _encode(self, texts):
        import torch

        self.calls.append(len(texts))
        if len(texts) * 102 > self.limit:  # every text below is 100 tokens + 2 special
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._encode(texts)


def test_oom_halves_the_budget_and_retries_then_remembers_it(caplog):
    embedder = _OomFake(_spec(batch_tokens=2048))
    embedder.calls = []
    texts = [f"t{i}" for i in range(20)]
    vectors, stats = embedder.embed_with_stats(texts, [100] * 20)
    np.testing.assert_allclose(vectors, np.stack([fake_vector(t, 8) for t in texts]), atol=1e-6)
    # 20 texts at 2048 -> OOM; 1020 (10 texts) -> OOM; 510 (5) -> OOM; 255 (2) fits.
    assert embedder.calls[:4] == [20, 10, 5, 2]
    assert stats.oom_retries == 3
    assert stats.batch_tokens == 255
    assert "halved" in caplog.text
    # The next partition starts at the remembered ceiling: no OOM again.
    embedder.calls = []
    _, again = embedder.embed_with_stats(texts, [100] * 20)
    assert again.oom_retries == 0 and max(embedder.calls) == 2


def test_oom_on_a_single_text_is_an_embedding_error():
    embedder = _OomFake(_spec(batch_tokens=2048))
    embedder.limit = 50
    embedder.calls = []
    with pytest.raises(EmbeddingError, match="out of memory on a single text"):
        embedder.embed_with_stats(["a", "b"], [100, 100])


def test_other_errors_are_not_mistaken_for_oom():
    class Broken(FakeEmbedder):
        def _encode(self, texts):
            raise ValueError("bad input")

    with pytest.raises(ValueError):
        Broken(_spec()).embed_with_stats(["a", "b"], [1, 1])


def test_gpu_budget_grows_with_free_memory():
    per_token = hardware.activation_bytes_per_token(
        hidden_size=384, intermediate_size=1536, num_heads=12, max_seq_length=256, element_bytes=2
    )
    assert per_token == (1536 + 4 * 384 + 2 * 12 * 256) * 2
    grown = hardware.gpu_batch_tokens(8192, free_bytes=8 * 2**30, bytes_per_token=per_token)
    assert grown == min(hardware.MAX_GPU_BATCH_TOKENS, 4 * 2**30 // per_token) > 8192
    # Never below the configured budget, whatever the GPU says.
    assert hardware.gpu_batch_tokens(8192, free_bytes=10 * 2**20, bytes_per_token=per_token) == 8192
    assert hardware.gpu_batch_tokens(8192, free_bytes=2**40, bytes_per_token=per_token) == hardware.MAX_GPU_BATCH_TOKENS


# --------------------------------------------------------------------------- precision


def test_kernel_cache_bound_keeps_an_operators_setting(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # so that teardown restores what was there
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "8")
    assert hardware.bound_kernel_caches() == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(hardware.KERNEL_CACHE_ENTRIES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]),
        "LRU_CACHE_CAPACITY": "8",
    }


def test_auto_precision_follows_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert hardware.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert hardware.resolve_precision("auto", "cpu") == "fp32"
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"  # allowed (emulated), with a warning


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        hardware.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        config.embedder_spec(precision="fp16", device="cpu")
    # device auto: the worker decides (it may have a GPU), so the client accepts it.
    assert config.embedder_spec(precision="fp16", device="auto").precision == "fp16"


def test_onnx_refuses_bf16_and_quantize_needs_onnx():
    with pytest.raises(ConfigError, match="onnx backend runs fp32"):
        config.embedder_spec(backend="onnx", precision="bf16")
    with pytest.raises(ConfigError, match="needs --backend onnx"):
        config.embedder_spec(quantize="int8")


def test_mixing_precisions_in_a_collection_is_allowed():
    fp32 = CollectionInfo(model="minilm", dimensions=384, precision="fp32")
    bf16 = CollectionInfo(model="minilm", dimensions=384, precision="bf16")
    bf16.check_compatible(fp32, collection="kb")  # no error
    assert CollectionInfo.from_metadata(bf16.to_metadata()).precision == "bf16"


def test_cache_bounds_come_from_config_into_the_spec():
    import dask.config

    with dask.config.set({"embedfleet.embed.cache.max-models": 3, "embedfleet.embed.cache.max-memory": "1GiB"}):
        spec = config.embedder_spec()
    assert (spec.cache_max_models, spec.cache_max_bytes) == (3, 2**30)
    # The bounds do not change which model a spec loads.
    assert spec.cache_key == config.embedder_spec().cache_key


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_texts():
    return help_topic_chunks(topics=12, limit=48)


@pytest.mark.slow
def test_sentence_transformers_matches_plain_encode(real_texts):
    from sentence_transformers import SentenceTransformer

    texts, counts = real_texts
    spec = config.embedder_spec(precision="fp32", device="cpu")
    from embedfleet.embedders.sentence_transformers import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(spec)
    assert embedder.count_tokens(texts[:5]) == counts[:5]
    vectors, stats = embedder.embed_with_stats(texts, counts, batch_tokens=4096)
    plain = SentenceTransformer(config.resolve_model_path(spec.model.path), device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True
    )
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 384)
    assert float(((vectors * plain).sum(axis=1)).min()) > 0.9999
    assert stats.padding_efficiency > 0.9


@pytest.mark.slow
@pytest.mark.skipif(not hardware.cpu_supports_bf16(), reason="CPU without native bf16")
def test_bf16_is_close_to_fp32(real_texts):
    from embedfleet.embedders.sentence_transformers import SentenceTransformerEmbedder

    texts, counts = real_texts
    fp32 = SentenceTransformerEmbedder(config.embedder_spec(precision="fp32", device="cpu"))
    auto = SentenceTransformerEmbedder(config.embedder_spec(precision="auto", device="cpu"))
    assert auto.precision == "bf16"
    a, _ = fp32.embed_with_stats(texts, counts)
    b, _ = auto.embed_with_stats(texts, counts)
    cos = (a * b).sum(axis=1)
    assert b.dtype == np.float32
    assert float(cos.min()) >= 0.995, cos.min()


_SHAPES_SCRIPT = """
import json, os
from embedfleet import config
from embedfleet.embedders.hardware import KERNEL_CACHE_ENTRIES, release_freed_memory
from embedfleet.embedders.sentence_transformers import SentenceTransformerEmbedder

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

embedder = SentenceTransformerEmbedder(config.embedder_spec(precision="bf16", device="cpu", threads=1))
samples = []
# One text per batch, one more token each time: in the first round every forward pass is a
# shape not seen before; the second round sees the same shapes again.
for _round in range(2):
    for words in range(8, 248):
        embedder.embed_with_stats(["hello " * words], [words])
        if words in (47, 247):
            release_freed_memory()
            samples.append(rss_mib())
print(json.dumps({"growth_mib": samples[1] - samples[0], "again_growth_mib": samples[3] - samples[2],
                  "caches": {k: os.environ.get(k) for k in KERNEL_CACHE_ENTRIES}}))
"""


def _rss_growth_over_new_shapes(env_overrides: dict[str, str]) -> dict:
    # A fresh process: these caches are sized when the process builds its first kernel.
    env = {k: v for k, v in os.environ.items() if k not in hardware.KERNEL_CACHE_ENTRIES}
    env.update(env_overrides)
    done = subprocess.run([sys.executable, "-c", _SHAPES_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not hardware.cpu_supports_bf16(), reason="CPU without native bf16: no oneDNN bf16 kernels")
def test_worker_memory_does_not_grow_with_the_batch_shapes_it_has_seen():
    bounded = _rss_growth_over_new_shapes({})
    assert bounded["caches"] == {k: str(v) for k, v in hardware.KERNEL_CACHE_ENTRIES.items()}
    # The libraries' own default, which an operator's environment still overrides: it grows,
    # so the bounded run's flatness is the bound's doing (~2.4 MiB per new shape measured).
    unbounded = _rss_growth_over_new_shapes({k: "1024" for k in hardware.KERNEL_CACHE_ENTRIES})
    assert unbounded["caches"]["LRU_CACHE_CAPACITY"] == "1024"
    assert unbounded["growth_mib"] > 100, unbounded
    # Not zero on every CPU: on an AMX Xeon torch keeps ~0.1 MiB per new sequence length in
    # caches these variables do not bound (21 MiB over these 200 shapes, 392 MiB unbounded;
    # 0.3 MiB when the same shapes come again). A worker's shapes are bounded by the model's
    # max_seq_length, and shapes seen again cost nothing more: a long job's workers stay level.
    assert bounded["growth_mib"] < unbounded["growth_mib"] / 4, (bounded, unbounded)
    assert bounded["again_growth_mib"] < 2, bounded
