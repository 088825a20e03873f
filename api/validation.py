"""Service-side checks of a submitted job, on top of the `DistillSettings` schema.

The schema says what a run *can* be; these checks say what this server *allows*: limits on size,
remote code, and which models and data a job may read. Every refusal is a 422 naming the field
(`teacher`, `student`, `dataset.source`, `max_steps`, ...), so the client can point at the line
of the user's file. Local sources are rewritten to the resolved absolute path that was checked,
so the worker opens exactly what was allowed, whatever its working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy.orm import Session

from core.errors import AmidError
from core.settings import DistillSettings
from store.config import ServiceConfig
from store.jobs import JobNotFound, get_job
from store.states import JobStatus

# `name` or `org/name` as the Hugging Face hub spells them: no leading dot, no `..`, one slash.
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
HUB_ID = re.compile(rf"{_HUB_PART}(/{_HUB_PART})?")
JOB_REF = re.compile(r"job:([0-9a-f]{32})")
_JOB_PREFIX = "job:"


class SettingRefused(AmidError):
    """A setting the schema accepts but this server does not allow."""

    status_code = 422


def validate_job_settings(
    session: Session,
    settings: DistillSettings,
    config: ServiceConfig,
    *,
    owner: str | None,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """The settings to store, checked against the server's limits; raises `SettingRefused`.

    `owner` is whose jobs a `job:<id>` may name (None: an admin, any job).
    """
    public = settings.public_dict()
    _refuse_nul(public, "")
    if settings.max_steps is not None and settings.max_steps > config.max_steps_limit:
        raise SettingRefused(
            f"max_steps {settings.max_steps} exceeds this server's limit of "
            f"{config.max_steps_limit}",
            field="max_steps",
        )
    if settings.max_length > config.max_length_limit:
        raise SettingRefused(
            f"max_length {settings.max_length} exceeds this server's limit of "
            f"{config.max_length_limit}",
            field="max_length",
        )
    if settings.trust_remote_code and not config.allow_trust_remote_code:
        raise SettingRefused(
            "trust_remote_code is not allowed on this server", field="trust_remote_code"
        )
    base = cwd or Path.cwd()
    for name in ("teacher", "student"):
        public[name] = _check_model(
            session, public[name], name, config=config, owner=owner, base=base
        )
    public["dataset"]["source"] = _check_source(
        public["dataset"]["source"], "dataset.source", config.data_roots, config, base
    )
    return public


def _refuse_nul(value: Any, where: str) -> None:
    # Postgres text and JSONB cannot hold U+0000; refuse it here rather than fail at insert.
    if isinstance(value, str) and "\x00" in value:
        raise SettingRefused("must not contain a NUL character", field=where or None)
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(key, where)
            _refuse_nul(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for item in value:
            _refuse_nul(item, where)


def _check_model(
    session: Session,
    source: str,
    field: str,
    *,
    config: ServiceConfig,
    owner: str | None,
    base: Path,
) -> str:
    if source.startswith(_JOB_PREFIX):
        match = JOB_REF.fullmatch(source)
        if match is None:
            raise SettingRefused(f"{source!r} is not a job reference (job:<32 hex>)", field=field)
        try:
            job = get_job(session, match.group(1), owner)
        except JobNotFound as exc:
            raise SettingRefused(f"{source}: no such job", field=field) from exc
        if job.status != JobStatus.SUCCEEDED or not job.final_uri:
            raise SettingRefused(
                f"{source} has no final student (status {job.status})", field=field
            )
        return source
    return _check_source(source, field, config.model_roots, config, base)


def _check_source(
    source: str, field: str, roots: list[Path], config: ServiceConfig, base: Path
) -> str:
    """A local path under `roots` (returned resolved) or an allowed hub id (returned as is)."""
    path, explicit = _as_path(source, field, base)
    # `models/missing` where ./models is a local directory means a missing local path, not
    # a hub id of an org called "models".
    looks_local = "/" in source and (base / source.split("/", 1)[0]).is_dir()
    if explicit or looks_local or path.exists():
        return str(_under_roots(path, roots, field))
    if not HUB_ID.fullmatch(source) or ".." in source:
        raise SettingRefused(
            f"{source!r} is neither an existing local path nor a hub id (name or org/name)",
            field=field,
        )
    if not config.allow_hub:
        raise SettingRefused(
            f"{source!r} is not a local path, and hub ids are not allowed on this server",
            field=field,
        )
    return source


def _as_path(source: str, field: str, base: Path) -> tuple[Path, bool]:
    """The path `source` names, and whether it can only be a path (never a hub id)."""
    if source.startswith("file:"):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise SettingRefused(f"{source!r}: only local file:// URLs are allowed", field=field)
        return Path(unquote(parts.path)), True
    if "://" in source:
        raise SettingRefused(
            f"{source!r}: URLs other than file:// are not accepted here", field=field
        )
    explicit = source.startswith(("/", "./", "../", "~", ".")) or "\\" in source
    path = Path(source).expanduser()
    return (path if path.is_absolute() else base / path), explicit


def _under_roots(path: Path, roots: list[Path], field: str) -> Path:
    # resolve() follows every symlink and removes `..`, so a link or a climb out of a root is
    # judged by where it really lands.
    resolved = path.resolve()
    if not roots:
        raise SettingRefused("local paths are not allowed on this server", field=field)
    if not any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        raise SettingRefused(
            "path is outside the directories this server allows for " + field, field=field
        )
    if not resolved.exists():
        raise SettingRefused(f"{resolved} does not exist", field=field)
    return resolved
