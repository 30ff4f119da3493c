"""The public Python API: what ``embedfleet.__all__`` names exists, and every error is there."""

from __future__ import annotations

import inspect

import embedfleet
from embedfleet import errors


def test_every_exported_name_exists():
    missing = [name for name in embedfleet.__all__ if not hasattr(embedfleet, name)]
    assert not missing
    assert len(set(embedfleet.__all__)) == len(embedfleet.__all__)


def test_every_error_is_exported_and_in_the_tree():
    defined = {name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, errors.EmbedfleetError)}
    assert defined == set(errors.__all__)
    assert defined <= set(embedfleet.__all__)
    for name in defined:  # the docstring draws the whole tree
        assert name in errors.__doc__, name


def test_what_the_api_returns_is_exported():
    assert {"Hit", "JobResult", "SkippedDocument", "Progress", "JobSpec", "JobService"} <= set(embedfleet.__all__)
    assert embedfleet.JobService.__name__ == "JobService"
