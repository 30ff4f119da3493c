"""The job service: users, tiers, quotas, priority and the dispatcher (DESIGN §5).

Public API (also re-exported from :mod:`embedfleet`)::

    from embedfleet.schedulers import JobService, Dispatcher

:class:`JobService` (:mod:`~embedfleet.schedulers.service`) is the owner/notebook API; beside
it, admission (:mod:`~embedfleet.schedulers.admission`), the dispatcher's ledger
(:mod:`~embedfleet.schedulers.ledger`) and the one read model for the service, dashboard,
metrics and cron (:mod:`~embedfleet.schedulers.reads`), over one store
(:mod:`~embedfleet.schedulers.store`) with the record types in
:mod:`~embedfleet.schedulers.records` and the status moves in
:mod:`~embedfleet.schedulers.lifecycle`. The tables are in :mod:`~embedfleet.schedulers.models`,
tiers and effective priority in :mod:`~embedfleet.schedulers.priority`, the dispatcher in
:mod:`~embedfleet.schedulers.dispatcher` (a job's run in :mod:`~embedfleet.schedulers.execution`).
Importing this package does not import Dask's distributed, torch or the pipeline.
"""

from __future__ import annotations

from embedfleet.schedulers.dispatcher import Dispatcher, JobExecution, run_inline, run_once
from embedfleet.schedulers.models import SCHEMA_VERSION, STATUSES
from embedfleet.schedulers.priority import PrioritySettings, Tier, effective_priority, tiers
from embedfleet.schedulers.service import JobInfo, JobService, QuotaInfo, UserInfo

__all__ = [
    "JobService",
    "run_inline",
    "run_once",
    "JobInfo",
    "UserInfo",
    "QuotaInfo",
    "Dispatcher",
    "JobExecution",
    "Tier",
    "PrioritySettings",
    "effective_priority",
    "tiers",
    "SCHEMA_VERSION",
    "STATUSES",
]
