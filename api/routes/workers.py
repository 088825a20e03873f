"""/v1/workers: the pool (every key), and draining a worker (admin keys).

Any key sees every worker, its state, GPU and the id of the job it runs: the pool is shared, and
people wait on it. Whose job that is (the owner's key id and name) is shown to admin keys only,
as the jobs themselves are.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy.orm import Session

from api.deps import Caller, CallerDep, ReaderDep, SessionDep
from api.errors import Forbidden
from api.routes.jobs import ERRORS
from api.schemas import ErrorOut, WorkerList, WorkerOut, worker_out
from store import workers
from store.config import get_config

router = APIRouter(prefix="/v1/workers", tags=["pool"])

# No control characters: an id never has one, and Postgres refuses NUL outright.
WorkerId = Annotated[
    str,
    Path(
        max_length=255,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="A worker id, as GET /v1/workers lists it.",
    ),
]


@router.get(
    "",
    response_model=WorkerList,
    responses={401: ERRORS[401], 503: ERRORS[503]},
    summary="The pool: every worker, its state, GPU, current job and last report",
)
async def list_workers(reader: ReaderDep) -> WorkerList:
    stale_after_seconds = get_config().stale_after_seconds

    def pool(session: Session, caller: Caller) -> WorkerList:
        members = workers.list_workers(session, stale_after_seconds=stale_after_seconds)
        return WorkerList(items=[worker_out(m, show_owner=caller.is_admin) for m in members])

    return await reader.read(pool)


@router.post(
    "/{worker_id}/drain",
    response_model=WorkerOut,
    responses={
        401: ERRORS[401],
        403: {"model": ErrorOut, "description": "The key is not an admin key."},
        404: {"model": ErrorOut, "description": "No such worker."},
        409: {"model": ErrorOut, "description": "The worker is offline."},
        422: ERRORS[422],
        503: ERRORS[503],
    },
    summary="Drain a worker: it finishes its current job and takes no other (admin keys)",
)
def drain_worker(session: SessionDep, caller: CallerDep, worker_id: WorkerId) -> WorkerOut:
    if not caller.is_admin:
        raise Forbidden("draining a worker is for admin keys")
    stale_after_seconds = get_config().stale_after_seconds
    workers.request_drain(session, worker_id, stale_after_seconds=stale_after_seconds)
    session.commit()
    [member] = workers.list_workers(
        session, stale_after_seconds=stale_after_seconds, worker_id=worker_id
    )
    return worker_out(member, show_owner=True)
