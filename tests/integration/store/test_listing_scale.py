"""Listing 10,000 jobs pages through an index, never a scan of the table."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from store import jobs
from store.keys import create_api_key
from store.models import Job, utcnow

pytestmark = pytest.mark.integration

JOBS = 10_000
PAGE = 100
PAGES = 60


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


def _explain(session: Session, query: sa.Select[Any]) -> list[dict[str, Any]]:
    conn = session.connection()
    compiled = query.compile(dialect=conn.dialect)
    raw = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar_one()
    document = raw if isinstance(raw, list) else json.loads(raw)
    return _plan_nodes(document[0]["Plan"])


def test_deep_pages_use_the_keyset_index(session: Session) -> None:
    key, _ = create_api_key(session, "bulk")
    # Volume rows go in as one bulk insert (create_job is covered elsewhere; 10,000 round
    # trips would only slow the suite), shaped exactly as create_job writes them.
    start = utcnow() - timedelta(days=1)
    session.execute(
        sa.insert(Job),
        [
            {
                "id": uuid.uuid4().hex,
                "owner": key.id,
                "status": "queued" if n % 10 else "succeeded",
                "settings": {},
                "attempt": 0,
                "max_attempts": 3,
                "cancel_requested": False,
                "progress_step": 0,
                "latest_metrics": {},
                "created_at": start + timedelta(seconds=n),
                "updated_at": start,
            }
            for n in range(JOBS)
        ],
    )
    session.execute(sa.text("ANALYZE jobs"))

    # Walk to a deep page, checking the pages tile the owner's jobs in order.
    seen: list[Job] = []
    after = None
    for _ in range(PAGES):
        page = jobs.list_jobs(session, owner=key.id, limit=PAGE, after=after)
        seen.extend(page)
        after = jobs.encode_cursor(page[-1])
    assert len({job.id for job in seen}) == PAGES * PAGE
    assert all(a.created_at > b.created_at for a, b in itertools.pairwise(seen))

    for owner, status in [(key.id, None), (None, None), (None, "succeeded")]:
        query = jobs.list_jobs_query(owner=owner, status=status, limit=100, after=after)
        nodes = _explain(session, query)
        kinds = {node["Node Type"] for node in nodes}
        assert "Seq Scan" not in kinds, nodes
        assert "Sort" not in kinds, nodes  # the index already yields the order
        assert any(node.get("Index Name", "").startswith("ix_jobs_") for node in nodes), nodes
