"""Run one unit of DB work in its own session, retrying while the database is unreachable.

A worker that loses the database mid-job keeps training and retries its writes with backoff,
rather than dropping the job: the lease (heartbeat) is what decides whether it still owns it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from store.db import session_scope

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_DELAYS_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 30.0, 30.0, 30.0)


def with_session(work: Callable[[Session], T], *, what: str) -> T:
    """`work(session)` in a committed session; retried on OperationalError (about 2.5 minutes)."""
    for delay in (*RETRY_DELAYS_SECONDS, None):
        try:
            with session_scope() as session:
                return work(session)
        except OperationalError as exc:
            if delay is None:
                raise
            logger.warning("%s: database unavailable (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
