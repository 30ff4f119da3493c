"""Who is calling: the Bearer token of every ``/v1`` request, and the admin scope.

Any missing, malformed, unknown, expired or revoked token is the same 401 (with
``WWW-Authenticate: Bearer``): the answer tells a caller nothing about which tokens exist.
Secrets are never logged; uvicorn's access log has no headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

__all__ = ["Principal", "admin", "principal"]

_bearer = HTTPBearer(auto_error=False, description="A token from `embedfleet tokens create`.")


@dataclass(frozen=True)
class Principal:
    user: str
    admin: bool
    token_id: int


def _unauthorized() -> HTTPException:
    return HTTPException(status_code=401, detail="missing, invalid, expired or revoked token",
                         headers={"WWW-Authenticate": "Bearer"})


async def principal(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized()
    state = request.app.state.embedfleet
    info = await run_in_threadpool(state.tokens.authenticate, credentials.credentials)
    if info is None:
        raise _unauthorized()
    return Principal(user=info.user, admin=info.admin, token_id=info.id)


#: A route's caller (``who: Caller``): any valid token.
Caller = Annotated[Principal, Depends(principal)]


async def admin(who: Caller) -> Principal:
    if not who.admin:
        raise HTTPException(status_code=403, detail="this needs a token with the admin scope")
    return who


#: A route's caller with the admin scope.
Admin = Annotated[Principal, Depends(admin)]
