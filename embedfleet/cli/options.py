"""``@index_options``: the flags of a job's options, generated from :class:`IndexOptions`."""

from __future__ import annotations

import functools

import click

from embedfleet.options import IndexOptions, OptionField

__all__ = ["index_options"]


def _flag(field: OptionField):
    if field.kind is bool:
        return click.option(f"--{field.key}", field.name, is_flag=True, help=field.help)
    if field.choices is not None:
        kind = click.Choice(field.choices)
    elif field.kind is int:
        kind = click.IntRange(min=field.minimum)
    else:
        kind = click.STRING
    return click.option(f"--{field.key}", field.name, type=kind, default=None, metavar=field.metavar, help=field.help)


def index_options(command):
    """Add a flag for every :class:`IndexOptions` field; ``command`` gets them as ``options``.

    Click has checked each flag's type and choices; IndexOptions checks the rest.
    """

    @functools.wraps(command)
    def with_options(*args, **kwargs):
        fields = {field.name: kwargs.pop(field.name) for field in IndexOptions.fields()}
        return command(*args, options=IndexOptions(**fields), **kwargs)

    for field in reversed(IndexOptions.fields()):  # click lists the last applied first
        with_options = _flag(field)(with_options)
    return with_options
