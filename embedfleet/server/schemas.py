"""The API's request and response bodies (pydantic), the job options derived from IndexOptions.

:data:`JobRequest` is built from :meth:`IndexOptions.fields` so an option added there appears
in the API (and its OpenAPI schema) without being written out again. Left out on purpose:
``sink`` as a URI (a job names one of the operator's sinks, ``embedfleet.sinks.named``), and
anything that names a data dir, database or credential, which IndexOptions does not carry.
Unknown keys are refused (422), so ``{"sink_uri": ...}`` or ``{"data_dir": ...}`` never pass silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from embedfleet.options import IndexOptions

__all__ = [
    "EXCLUDED_OPTIONS",
    "Document",
    "EmbeddingsRequest",
    "JobRequest",
    "SearchHit",
    "SearchRequest",
    "SearchResponse",
    "TierRequest",
    "TokenRequest",
    "UserRequest",
    "option_values",
]

#: IndexOptions fields a submitter over the API may not set: the operator's sink is chosen by name.
EXCLUDED_OPTIONS = frozenset({"sink"})

#: How deep a document's metadata may nest: stores keep flat values, a few levels are generous,
#: and anything deeper only tests the recursion of every serialiser after this one.
METADATA_DEPTH = 8
#: The largest integer option: what every database and store column takes.
MAX_OPTION_INT = 2**31 - 1


def _text(value: str) -> str:
    # JSON can carry lone surrogates ("\ud800"); they are no text, and no UTF-8 encoder takes them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone surrogate (invalid Unicode)") from None
    return value


def _metadata(value: Any, depth: int = 0) -> Any:
    if depth > METADATA_DEPTH:
        raise ValueError(f"metadata nests deeper than {METADATA_DEPTH} levels")
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        for key, item in value.items():
            _text(key)
            _metadata(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _metadata(item, depth + 1)
    return value


Text = Annotated[str, AfterValidator(_text)]


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[Text, Field(min_length=1, max_length=1024)]
    text: Text
    metadata: Annotated[dict[str, Any], AfterValidator(_metadata)] | None = None


def _option_type(field) -> Any:
    if field.choices is not None:
        return Literal[field.choices]  # type: ignore[valid-type]
    if field.kind is int:
        return Annotated[int, Field(ge=field.minimum, le=MAX_OPTION_INT, strict=True)]
    if field.kind is bool:
        return Annotated[bool, Field(strict=True)]
    return Annotated[Text, Field(min_length=1, max_length=1024, pattern=r"\S")]


def _job_fields() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in IndexOptions.fields():
        if f.name in EXCLUDED_OPTIONS:
            continue
        kind = _option_type(f)
        if f.kind is bool:
            out[f.name] = (kind, Field(default=f.default, description=f.help))
        else:
            out[f.name] = (kind | None, Field(default=None, description=f.help))
    return out


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Annotated[Text, Field(min_length=1, max_length=4096, description="A path under the operator's jobs.allowed-roots.")] | None = None
    documents: list[Document] | None = Field(
        default=None, description="Inline content, kept in the data dir as the job's source (size-limited: 413)."
    )
    sink: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default="default", description="One of the operator's sinks by name (embedfleet.sinks.named)."
    )
    priority: Annotated[int, Field(ge=0, le=100, strict=True)] | None = Field(default=None, description="Base priority 0-100.")


JobRequest = create_model("JobRequest", __base__=_JobBase, **_job_fields())


def option_values(request: BaseModel) -> dict[str, Any]:
    """The IndexOptions keywords a request sets."""
    names = {f.name for f in IndexOptions.fields()} - EXCLUDED_OPTIONS
    return {name: getattr(request, name) for name in names if getattr(request, name) is not None}


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Annotated[Text, Field(min_length=1, max_length=10_000)]
    k: Annotated[int, Field(ge=1, le=1000, strict=True)] = 5
    sink: Annotated[str, Field(min_length=1, max_length=64)] = "default"


class SearchHit(BaseModel):
    doc_id: str
    chunk_id: str
    chunk_index: int
    score: float
    text: str
    start: int | None = None
    end: int | None = None
    section: str | None = None  # the heading the chunk lies under, where the reader recorded one


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    cached: bool


class EmbeddingsRequest(BaseModel):
    # OpenAI clients send fields this server does not use (user, dimensions): ignored, not refused.
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=128)]
    input: Text | list[Text]
    encoding_format: Literal["float", "base64"] = "float"


class UserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(min_length=1, max_length=64)]
    tier: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class TierRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: Annotated[str, Field(min_length=1, max_length=64)]


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: Annotated[str, Field(min_length=1, max_length=64)]
    admin: bool = False
    expires_in_seconds: Annotated[float, Field(gt=0, le=10 * 365 * 86400)] | None = None
    note: Annotated[str, Field(max_length=255)] | None = None
