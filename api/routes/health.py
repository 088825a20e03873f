"""Liveness and readiness probes (no API key: load balancers and orchestrators call them)."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from store.db import get_engine

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_SECONDS = 2.0


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    # On the event loop, touching nothing: it answers even when every thread and connection of
    # the API is busy (sync routes would queue behind them for a thread).
    return {"status": "ok"}


def _database_ok() -> str | None:
    """None when the database answers, else why not."""
    try:
        with get_engine().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        logger.warning("readiness: database down: %s", exc)
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig else exc
        return f"unreachable ({type(cause).__name__})"
    return None


@router.get(
    "/readyz",
    summary="The database and the broker are reachable",
    responses={503: {"description": "Names the part that is down."}},
)
def readyz() -> JSONResponse:
    from store.queue import broker_reachable

    database = _database_ok()
    broker = None if broker_reachable(BROKER_TIMEOUT_SECONDS) else "unreachable"
    checks = {"database": database or "ok", "broker": broker or "ok"}
    down = [name for name, problem in (("database", database), ("broker", broker)) if problem]
    if down:
        body = {
            "status": "unavailable",
            "error": "NotReady",
            "detail": f"{' and '.join(down)} unavailable",
            "field": None,
            "checks": checks,
        }
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "checks": checks})
