"""The contract between the fault tests and scripts/reliability.py: each passing fault test
appends one JSON object per line to the file named by REPORT_ENV, with exactly these keys."""

from __future__ import annotations

from typing import Any

REPORT_ENV = "AMID_FAULTS_REPORT"
FAULT_KEYS: dict[str, type] = {
    "fault": str,  # a short name, e.g. "worker SIGKILL mid-job"
    "action": str,  # one sentence: what was done
    "held": str,  # one sentence: what was observed to hold
    "jobs_submitted": int,
    "jobs_lost": int,  # submitted jobs that did not reach the expected terminal state
    "measured": dict,  # named figures, e.g. {"cancel_to_idle_seconds": 0.6}
}


def record_problem(record: Any) -> str | None:
    """Why `record` breaks the contract, or None when it keeps it."""
    if not isinstance(record, dict) or set(record) != set(FAULT_KEYS):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        return f"keys {keys}, expected {sorted(FAULT_KEYS)}"
    for key, kind in FAULT_KEYS.items():
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key} is {type(value).__name__}, expected {kind.__name__}"
    bad = [
        name
        for name, value in record["measured"].items()
        if not isinstance(name, str)
        or isinstance(value, bool)
        or not isinstance(value, int | float)
    ]
    if bad:
        return f"measured values that are not numbers: {bad}"
    return None
