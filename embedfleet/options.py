"""A job's options, defined once (DESIGN §7): :class:`IndexOptions`.

Every entry point derives from it instead of listing the options again: the CLI flags of
``embedfleet index`` and ``embedfleet jobs submit`` (:func:`embedfleet.cli.options.index_options`),
the keywords of :func:`embedfleet.index`, :meth:`JobService.submit` and
:func:`embedfleet.schedulers.dispatcher.run_inline`, the keys of a cron schedule, and the spec
:func:`embedfleet.pipeline.spec.build_job_spec` builds from it. :meth:`IndexOptions.fields`
describes each option (type, choices, minimum, help) for whoever generates an interface from it.

A value of None means "the config's value" (``embedfleet.chunk.size`` ...), or the built-in
default where there is no config key (mode ``sync``); it is resolved when the spec is built,
so a config change reaches the next job.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from embedfleet.config import ChunkStructure, ChunkUnit, Precision
from embedfleet.errors import ConfigError

__all__ = ["IndexOptions", "OptionField", "Mode", "OnError", "Quantize"]

Mode = Literal["sync", "append", "full"]
OnError = Literal["skip", "fail"]
Quantize = Literal["int8"]


def _option(help: str, *, default: Any = None, minimum: int | None = None, metavar: str | None = None) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "metavar": metavar})


@dataclass(frozen=True)
class IndexOptions:
    """What one indexing job is asked to do; validated when built (:class:`ConfigError`).

    >>> IndexOptions(collection="kb", chunk_size=128, mode="full")  # doctest: +SKIP
    """

    collection: str | None = _option("Collection name (default 'default').")
    sink: str | None = _option(
        "chroma:///abs/dir, chroma://host:port, milvus:///abs/file.db, milvus://host:port, parquet:///abs/dir. "
        "Default chroma://<data-dir>/chroma.",
        metavar="URI",
    )
    model: str | None = _option("A model name from embedfleet.models (default minilm).")
    chunk_size: int | None = _option("Chunk length in units (default 200).", minimum=1)
    chunk_overlap: int | None = _option("Units shared by consecutive chunks (default 32).", minimum=0)
    chunk_unit: ChunkUnit | None = _option("Chunk unit; tokens are the model's own (default).")
    chunk_structure: ChunkStructure | None = _option(
        "auto (default): Markdown, RST and HTML headings start a chunk and each chunk records its section; "
        "none: plain windows."
    )
    chunk_heading_context: bool = _option(
        "The model embeds each chunk's section path before its text (stored text unchanged; "
        "default embedfleet.chunk.heading-context).",
        default=False,
    )
    mode: Mode | None = _option(
        "sync (default): embed new/changed chunks and delete stale ones; append: never delete; full: re-embed everything."
    )
    on_error: OnError | None = _option("Unreadable documents: skip with a reason (default) or stop.")
    text_column: str | None = _option("Text column of a JSONL/CSV/Parquet source (default 'text').")
    id_column: str | None = _option("Document id column of a table source (default: file name and row number).")
    precision: Precision | None = _option("Model precision (default fp32; auto picks bf16 where the hardware has it).")
    backend: str | None = _option("Embedder backend: sentence-transformers (default), onnx or openvino.")
    batch_tokens: int | None = _option(
        "Padded tokens per forward pass (batch size x longest text; default embedfleet.embed.batch-tokens, "
        "else the backend's measured best).",
        minimum=1,
    )
    quantize: Quantize | None = _option(
        "With --backend onnx: dynamic int8 weights; with openvino: static int8, calibrated (faster on CPU, less "
        "exact; opt-in; `embedfleet index` prints its measured cosine to fp32)."
    )
    allow_mass_delete: bool = _option(
        "Let a sync delete more than embedfleet.index.max-delete-fraction of the collection's documents, "
        "or delete from a source with none.",
        default=False,
    )

    allow_mixed: bool = _option(
        "Add vectors of another family to a collection (float: fp32/bf16/fp16 of any backend; int8 of one "
        "backend) and record it as mixed; without it such a job is refused before anything is written.",
        default=False,
    )

    def __post_init__(self) -> None:
        problems = [f"{f.key} {why}" for f in self.fields() if (why := f.problem(getattr(self, f.name))) is not None]
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    @functools.cache
    def fields(cls) -> tuple["OptionField", ...]:
        """Each option's name, type, choices, minimum, default and help, in declaration order."""
        hints = typing.get_type_hints(cls)
        return tuple(OptionField.of(f, hints[f.name]) for f in dataclasses.fields(cls))

    @classmethod
    def merge(cls, options: "IndexOptions | None" = None, /, **fields: Any) -> "IndexOptions":
        """``options`` (default: all None) with ``fields`` replacing its values: the keyword API of
        :func:`embedfleet.index` and :meth:`JobService.submit`, checked against the option names."""
        names = [f.name for f in cls.fields()]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            hints = "; ".join(f"{name!r}{_suggest(name, names)}" for name in unknown)
            raise ConfigError(f"unknown option {hints}; options: {', '.join(names)}")
        if options is None:
            return cls(**fields)
        if not isinstance(options, cls):
            raise TypeError(f"options must be an IndexOptions, not {type(options).__name__}")
        return dataclasses.replace(options, **fields) if fields else options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OptionField:
    """One option of :class:`IndexOptions` as an interface shows it."""

    name: str  # the Python keyword: chunk_size
    key: str  # the CLI flag without dashes, the cron key, and how messages name it: chunk-size
    kind: type  # str, int or bool
    choices: tuple[str, ...] | None  # a Literal's values
    minimum: int | None
    default: Any
    help: str
    metavar: str | None

    @classmethod
    def of(cls, field: dataclasses.Field, hint: Any) -> "OptionField":
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        (kind,) = [a for a in args if a is not type(None)]
        choices = None
        if typing.get_origin(kind) is Literal:
            choices, kind = typing.get_args(kind), str
        return cls(
            name=field.name,
            key=field.name.replace("_", "-"),
            kind=kind,
            choices=choices,
            minimum=field.metadata["minimum"],
            default=field.default,
            help=field.metadata["help"],
            metavar=field.metadata["metavar"],
        )

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is no valid value of this option (``"must be ..., not ..."``), or None."""
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, not {value!r}"
        if value is None:
            return None
        if self.choices is not None:
            if value in self.choices:
                return None
            allowed = self.choices[0] if len(self.choices) == 1 else f"one of {', '.join(self.choices)}"
            return f"must be {allowed}, not {value!r}"
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be an integer, not {value!r}"
            if self.minimum is not None and value < self.minimum:
                return f"must be at least {self.minimum}, not {value}"
            return None
        if not isinstance(value, str) or not value.strip():
            return f"must be a non-empty string, not {value!r}"
        return None


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
