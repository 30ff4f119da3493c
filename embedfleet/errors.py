"""Every error embedfleet raises on purpose.

Library code raises these; only :mod:`embedfleet.cli` turns them into a message and an
exit code. The tree::

    EmbedfleetError
    ├── ConfigError                 a config key or option has a bad value
    │   └── ChunkingError           chunk size/overlap/unit do not fit the model
    ├── SourceError                 the source cannot be opened or is invalid as a whole
    │   ├── DocumentError           one document cannot be read (with --on-error fail)
    │   └── DuplicateDocumentError  one source holds the same doc_id twice
    ├── UnknownBackendError         no embedder backend / sink scheme of that name
    ├── BackendUnavailableError     the backend's optional dependency is missing (names the extra)
    ├── EmbeddingError              the model failed on a batch
    │   └── ProviderUnavailable     a remote embedding provider kept failing: its circuit is open
    ├── SinkError                   the vector store refused or failed a request
    │   ├── CollectionMismatch      the collection was built by another model or dimension
    │   └── StoreBusy               an embedded store is being written by another process
    ├── JobError                    a job cannot run as asked
    │   ├── JobNotFound             no such job (or not visible to this user)
    │   ├── JobCancelled            the job was cancelled while running
    │   ├── MassDeleteRefused       a sync would delete most of a collection (or the source is empty)
    │   ├── CorruptManifest         a collection's manifest cannot be read (mode full rebuilds it)
    │   ├── IllegalTransition       a job status write the lifecycle does not allow (a bug, not a user error)
    │   └── QueueFull               the user's queue limit is reached
    ├── QuotaExceeded               the user's daily chunk quota would be exceeded
    ├── PermissionDenied            the user may not do this
    └── ScheduleError               a cron schedule file is invalid
"""

from __future__ import annotations

__all__ = [
    "EmbedfleetError",
    "ConfigError",
    "ChunkingError",
    "SourceError",
    "DocumentError",
    "DuplicateDocumentError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "EmbeddingError",
    "ProviderUnavailable",
    "SinkError",
    "CollectionMismatch",
    "StoreBusy",
    "JobError",
    "JobNotFound",
    "JobCancelled",
    "QueueFull",
    "MassDeleteRefused",
    "CorruptManifest",
    "IllegalTransition",
    "QuotaExceeded",
    "PermissionDenied",
    "ScheduleError",
]


class EmbedfleetError(Exception):
    """Base of every error embedfleet raises on purpose."""

    exit_code = 1


class ConfigError(EmbedfleetError):
    exit_code = 2


class ChunkingError(ConfigError):
    pass


class SourceError(EmbedfleetError):
    pass


class DocumentError(SourceError):
    def __init__(self, doc_id: str, reason: str):
        super().__init__(f"{doc_id}: {reason}")
        self.doc_id = doc_id
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.doc_id, self.reason))


class DuplicateDocumentError(SourceError):
    def __init__(self, duplicates: list[str]):
        shown = ", ".join(duplicates[:10]) + (" ..." if len(duplicates) > 10 else "")
        super().__init__(f"{len(duplicates)} doc_id(s) occur more than once in the source: {shown}")
        self.duplicates = duplicates

    def __reduce__(self):
        return (type(self), (self.duplicates,))


class UnknownBackendError(EmbedfleetError):
    exit_code = 2

    def __init__(self, kind: str, name: str, known: list[str]):
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known)) or '(none)'}")
        self.kind, self.name, self.known = kind, name, known

    def __reduce__(self):
        return (type(self), (self.kind, self.name, self.known))


class BackendUnavailableError(EmbedfleetError):
    def __init__(self, what: str, extra: str, cause: str = ""):
        message = f"{what} needs an optional dependency: pip install 'embedfleet[{extra}]'"
        if cause:
            message += f" ({cause})"
        super().__init__(message)
        self.what, self.extra, self.cause = what, extra, cause

    def __reduce__(self):
        return (type(self), (self.what, self.extra, self.cause))


class EmbeddingError(EmbedfleetError):
    pass


class ProviderUnavailable(EmbeddingError):
    """A remote provider's circuit breaker is open: requests fail at once until its cool-down ends."""


class SinkError(EmbedfleetError):
    pass


class CollectionMismatch(SinkError):
    pass


class StoreBusy(SinkError):
    """A dispatcher's job waits queued for it; ``embedfleet index`` fails with it."""


class JobError(EmbedfleetError):
    pass


class JobNotFound(JobError):
    pass


class JobCancelled(JobError):
    pass


class MassDeleteRefused(JobError):
    """Stopped before deleting: the user confirms with ``--allow-mass-delete``."""


class CorruptManifest(JobError):
    pass


class IllegalTransition(JobError):
    """A status write the lifecycle does not allow (a bug in the caller, not a user error)."""


class QueueFull(JobError):
    pass


class QuotaExceeded(EmbedfleetError):
    def __init__(self, message: str, *, remaining: int = 0, requested: int = 0):
        super().__init__(message)
        self.remaining = remaining
        self.requested = requested

    def __reduce__(self):
        return (_rebuild_quota, (str(self), self.remaining, self.requested))


def _rebuild_quota(message: str, remaining: int, requested: int) -> QuotaExceeded:
    return QuotaExceeded(message, remaining=remaining, requested=requested)


class PermissionDenied(EmbedfleetError):
    pass


class ScheduleError(ConfigError):
    pass
