"""API tokens of ``embedfleet serve``: created by an administrator, shown once, stored hashed.

A token is ``ef_`` + 43 URL-safe characters (32 random bytes). The database keeps its SHA-256
(:class:`~embedfleet.schedulers.models.ApiToken`), never the secret, so :meth:`TokenStore.create`
is the only place the secret ever exists outside its holder; nothing here logs it. A token
belongs to one user, may carry the admin scope (users, tiers and tokens over the API), may
expire, and can be revoked; :meth:`TokenStore.authenticate` turns a presented secret into its
:class:`TokenInfo` or None, for a missing, unknown, expired or revoked one alike.

The user ``embedfleet index`` runs as (config ``embedfleet.user``, ``local`` by default) and its
unlimited tier are the administrator's own and never get a token: the API cannot reach them.

    store = TokenStore(service)                       # the job service's database
    info, secret = store.create("alice", expires_in=dt.timedelta(days=30))
    store.authenticate(secret).user                   # 'alice'
    store.revoke(info.id)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from embedfleet import config
from embedfleet.errors import ConfigError
from embedfleet.schedulers.models import ApiToken, read_engine, utcnow

if TYPE_CHECKING:
    from embedfleet.schedulers.service import JobService

__all__ = ["TOKEN_PREFIX", "TokenInfo", "TokenStore", "hash_secret"]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ef_"
_SECRET_BYTES = 32


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A token as ``tokens list`` shows it: everything but the secret, which is not kept."""

    id: int
    user: str
    admin: bool
    note: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    def state(self, now: dt.datetime | None = None) -> str:
        now = now or utcnow()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        def iso(value: dt.datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "id": self.id,
            "user": self.user,
            "admin": self.admin,
            "note": self.note,
            "state": self.state(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
        }

    @classmethod
    def from_row(cls, row: ApiToken) -> TokenInfo:
        return cls(row.id, row.user, bool(row.admin), row.note, row.created_at, row.expires_at, row.revoked_at,
                   row.last_used_at)


class TokenStore:
    """Tokens in the job service's database (the ``ef_tokens`` table, created with the others).

    :param service: the :class:`JobService` whose database and users the tokens belong to.
    :param touch_every: how often (seconds) a token's ``last_used_at`` is written at most;
        a write per request would make every API call a database write.
    """

    def __init__(self, service: JobService, *, touch_every: float = 60.0):
        self.service = service
        self.engine = service.engine
        self._read_engine = read_engine(self.engine)
        self.touch_every = touch_every

    @staticmethod
    def _reserved_user(user: str) -> bool:
        return user == str(config.get("user"))

    def create(self, user: str, *, admin: bool = False, expires_in: dt.timedelta | None = None,
               note: str | None = None) -> tuple[TokenInfo, str]:
        """A new token for ``user`` (created at the default tier if unknown); returns it and its secret.

        The secret is returned here once and stored only as its hash.
        """
        if self._reserved_user(user):
            raise ConfigError(
                f"user {user!r} is the local administrator's (embedfleet.user) and is not reachable over the API; "
                "create the token for another user"
            )
        if expires_in is not None and expires_in.total_seconds() <= 0:
            raise ConfigError(f"a token's lifetime must be positive, not {expires_in}")
        if note is not None and len(note) > 255:
            raise ConfigError("a token's note is at most 255 characters")
        if self.service.get_user(user) is None:  # also validates the user id
            self.service.add_user(user)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        now = utcnow()
        row = ApiToken(user=user, secret_hash=hash_secret(secret), admin=bool(admin), note=note, created_at=now,
                       expires_at=now + expires_in if expires_in is not None else None)
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.add(row)
        log.info("created token %d for %s%s", row.id, user, " (admin)" if admin else "")
        return TokenInfo.from_row(row), secret

    def list(self, *, user: str | None = None) -> list[TokenInfo]:
        stmt = select(ApiToken).order_by(ApiToken.id)
        if user is not None:
            stmt = stmt.where(ApiToken.user == user)
        with Session(self._read_engine) as session, session.begin():
            return [TokenInfo.from_row(r) for r in session.execute(stmt).scalars()]

    def get(self, token_id: int) -> TokenInfo:
        with Session(self._read_engine) as session, session.begin():
            row = session.get(ApiToken, int(token_id))
            if row is None:
                raise ConfigError(f"no token {token_id}")
            return TokenInfo.from_row(row)

    def revoke(self, token_id: int) -> TokenInfo:
        """Revoke a token at once; revoking a revoked token keeps its first revocation time."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            row = session.execute(select(ApiToken).where(ApiToken.id == int(token_id)).with_for_update()).scalar_one_or_none()
            if row is None:
                raise ConfigError(f"no token {token_id}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            info = TokenInfo.from_row(row)
        log.info("revoked token %d of %s", info.id, info.user)
        return info

    def authenticate(self, secret: str | None) -> TokenInfo | None:
        """The active token whose secret is ``secret``, else None (missing, unknown, expired, revoked)."""
        if not secret or not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
            return None
        digest = hash_secret(secret)
        with Session(self._read_engine) as session, session.begin():
            row = session.execute(select(ApiToken).where(ApiToken.secret_hash == digest)).scalar_one_or_none()
            if row is None or not hmac.compare_digest(row.secret_hash, digest):
                return None
            info = TokenInfo.from_row(row)
        now = utcnow()
        if info.state(now) != "active" or self._reserved_user(info.user):
            return None
        if info.last_used_at is None or (now - info.last_used_at).total_seconds() >= self.touch_every:
            with Session(self.engine) as session, session.begin():
                session.execute(update(ApiToken).where(ApiToken.id == info.id).values(last_used_at=now))
        return info
