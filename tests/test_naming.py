"""physical_name: injective, reversible, and legal in both Chroma and Milvus."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from embedfleet.errors import ConfigError
from embedfleet.sinks.naming import check_part, parse_physical_name, physical_name

PART_RE = r"[a-z0-9][a-z0-9_-]{0,59}"
# Names made of the characters the escaping rewrites are where collisions would hide.
parts = st.one_of(
    st.from_regex(PART_RE, fullmatch=True),
    st.builds(lambda head, tail: head + tail, st.sampled_from("a0"), st.text("a_-", max_size=59)),
)

CHROMA_CHARS = re.compile(r"^[a-zA-Z0-9._-]+$")
IPV4 = re.compile(r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")
MILVUS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def legal_for_chroma(name: str) -> bool:
    return (
        3 <= len(name) <= 512
        and bool(CHROMA_CHARS.match(name))
        and name[0].isalnum()
        and name[-1].isalnum()
        and ".." not in name
        and not IPV4.match(name)
    )


def legal_for_milvus(name: str) -> bool:
    return len(name) <= 255 and bool(MILVUS.match(name))


@given(parts, parts)
@example("a" + "_" * 59, "0" + "-" * 59)  # the longest possible name
@example("a_", "b")
@example("a", "ub")
def test_legal_in_both_stores_and_round_trips(user, collection):
    name = physical_name(user, collection)
    assert legal_for_chroma(name), name
    assert legal_for_milvus(name), name
    # A left inverse exists, so the map is injective.
    assert parse_physical_name(name) == (user, collection)


@given(parts, parts, parts, parts)
@example("a_", "b", "a", "ub")
@example("a__b", "c", "a", "b__c")
@example("a-", "b", "a", "db")
def test_injective(u1, c1, u2, c2):
    if (u1, c1) != (u2, c2):
        assert physical_name(u1, c1) != physical_name(u2, c2)


@pytest.mark.parametrize(
    "pair_a, pair_b",
    [
        (("a_", "b"), ("a", "ub")),
        (("a_d", "x"), ("a-", "x")),
        (("a", "b__c"), ("a__b", "c")),
        (("a_u", "x"), ("a__", "x")),
    ],
)
def test_escaping_keeps_look_alikes_apart(pair_a, pair_b):
    assert physical_name(*pair_a) != physical_name(*pair_b)


invalid_parts = st.one_of(
    st.just(""),
    st.text(min_size=1, max_size=80).filter(lambda s: not re.fullmatch(PART_RE, s)),
    st.from_regex(r"[a-z0-9][a-z0-9_-]{60,70}", fullmatch=True),  # too long
    st.from_regex(r"[_-][a-z0-9_-]{0,10}", fullmatch=True),  # starts with a separator
    st.from_regex(r"[a-z0-9]*[A-Z./ ][a-z0-9]*", fullmatch=True),  # upper case, dots, slashes, blanks
)


@given(invalid_parts, parts)
def test_invalid_parts_rejected(bad, good):
    with pytest.raises(ConfigError):
        physical_name(bad, good)
    with pytest.raises(ConfigError):
        physical_name(good, bad)
    with pytest.raises(ConfigError):
        check_part("collection name", bad)


@pytest.mark.parametrize("value", [None, 3, b"abc"])
def test_non_strings_rejected(value):
    with pytest.raises(ConfigError):
        check_part("user id", value)


@given(st.text(max_size=300))
@example("ef_a__b__c")
@example("ef_a_x__b")
@example("ef___b")
@example("ef_a__")
@example("other_a__b")
def test_parse_accepts_only_names_it_could_have_made(name):
    parsed = parse_physical_name(name)
    if parsed is not None:
        assert physical_name(*parsed) == name


def test_parse_rejects_foreign_names():
    for name in ["", "kb", "ef_", "ef_alice", "ef_Alice__kb", "ef_a__b__c", "ef_a_x__b", "chroma_default"]:
        assert parse_physical_name(name) is None


@settings(max_examples=25, deadline=None)
@given(parts, parts)
def test_real_chroma_accepts_the_names(chroma_client, user, collection):
    name = physical_name(user, collection)
    chroma_client.get_or_create_collection(name)


@pytest.fixture(scope="module")
def chroma_client(tmp_path_factory):
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(
        path=str(tmp_path_factory.mktemp("naming-chroma")), settings=Settings(anonymized_telemetry=False)
    )


def test_real_milvus_lite_accepts_the_longest_names(tmp_path):
    from embedfleet.sinks.base import CollectionInfo, SinkSpec
    from embedfleet.sinks.milvus import MilvusSink

    names = [physical_name("a" + "_" * 59, "0" + "-" * 59), physical_name("0" * 60, "z" * 60), physical_name("a", "b")]
    with MilvusSink(SinkSpec(uri=f"milvus://{tmp_path}/names.db")) as sink:
        for name in names:
            sink.open(name, info=CollectionInfo(model="m", dimensions=2), create=True)
        assert set(names) <= set(sink.list_collections())
