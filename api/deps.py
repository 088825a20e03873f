"""Request dependencies: the database session, the caller's API key, and the enqueuer.

The session is the edge of the unit of work: a route that writes commits before it answers
(so a failed commit is the request's error, not a lost write after a 200); whatever is left
uncommitted when the request ends is rolled back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import Unauthorized
from store.db import get_sessionmaker
from store.keys import authenticate
from store.models import ApiKey

Enqueue = Callable[[str], None]


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Caller:
    key_id: str
    name: str
    is_admin: bool

    @property
    def scope(self) -> str | None:
        """The owner whose jobs this caller sees: None for an admin, who sees all."""
        return None if self.is_admin else self.key_id


# The two ways to send a key, declared as OpenAPI security schemes so the docs page's Authorize
# button sends them; neither refuses by itself (auto_error=False): `require_caller` decides.
BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`")


def _secret(bearer: HTTPAuthorizationCredentials | None, x_api_key: str | None) -> str | None:
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    if bearer is not None and bearer.credentials.strip():
        return bearer.credentials.strip()
    return None


def require_caller(
    session: SessionDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    x_api_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> Caller:
    secret = _secret(bearer, x_api_key)
    if secret is None:
        raise Unauthorized("an API key is required: `Authorization: Bearer <key>` or `X-API-Key`")
    key: ApiKey | None = authenticate(session, secret)
    if key is None:
        raise Unauthorized("the API key is not valid (unknown or revoked)")
    return Caller(key_id=key.id, name=key.name, is_admin=key.is_admin)


CallerDep = Annotated[Caller, Depends(require_caller)]


def get_enqueue() -> Enqueue:
    """The broker send, behind a dependency so tests can watch or break it."""
    from store.queue import enqueue

    return enqueue


EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
