"""Request dependencies: the database session, the caller's API key, and the enqueuer.

The session is the edge of the unit of work: a route that writes commits before it answers
(so a failed commit is the request's error, not a lost write after a 200); whatever is left
uncommitted when the request ends is rolled back.

Routes that only read take a `Reader` instead: FastAPI runs each sync dependency and the sync
route on a worker thread of its own, four thread hand-overs for a plain read, and under load
those hand-overs (and the interpreter lock they contend for) cost more than the query. A
reader authenticates and runs the route's read in one hand-over, on one autocommit session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import Unauthorized
from store.db import get_read_sessionmaker, get_sessionmaker
from store.keys import authenticate
from store.models import ApiKey

Enqueue = Callable[[str], None]
T = TypeVar("T")


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


def _required_secret(bearer: HTTPAuthorizationCredentials | None, x_api_key: str | None) -> str:
    secret = _secret(bearer, x_api_key)
    if secret is None:
        raise Unauthorized("an API key is required: `Authorization: Bearer <key>` or `X-API-Key`")
    return secret


def _caller(session: Session, secret: str) -> Caller:
    key: ApiKey | None = authenticate(session, secret)
    if key is None:
        raise Unauthorized("the API key is not valid (unknown or revoked)")
    return Caller(key_id=key.id, name=key.name, is_admin=key.is_admin)


def require_caller(
    session: SessionDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    x_api_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> Caller:
    return _caller(session, _required_secret(bearer, x_api_key))


CallerDep = Annotated[Caller, Depends(require_caller)]


@dataclass(frozen=True)
class Reader:
    """A read-only request's key, not yet checked: `read` checks it and reads in one go."""

    secret: str

    async def read(self, query: Callable[[Session, Caller], T]) -> T:
        """`query(session, caller)` on a worker thread, after the key is authenticated there."""
        return await run_in_threadpool(self._read, query)

    def _read(self, query: Callable[[Session, Caller], T]) -> T:
        with get_read_sessionmaker()() as session:
            return query(session, _caller(session, self.secret))


async def require_reader(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    x_api_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> Reader:
    # Async, so FastAPI runs it on the event loop: it only reads headers.
    return Reader(_required_secret(bearer, x_api_key))


ReaderDep = Annotated[Reader, Depends(require_reader)]


async def single_valued_query(request: Request) -> None:
    """Refuse a query parameter given twice (`?name=a&name=b`), on every route.

    No route takes a list in its query; FastAPI would silently keep the last value, so the
    first would be validated by nobody and ignored without a word.
    """
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise RequestValidationError(
                [
                    {
                        "loc": ("query", name),
                        "msg": "given more than once; give it once",
                        "type": "value_error",
                    }
                ]
            )
        seen.add(name)


def get_enqueue() -> Enqueue:
    """The broker send, behind a dependency so tests can watch or break it."""
    from store.queue import enqueue

    return enqueue


EnqueueDep = Annotated[Enqueue, Depends(get_enqueue)]
