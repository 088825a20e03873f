"""Service-side checks of a submitted job, on top of the `DistillSettings` schema.

The schema says what a run *can* be; these checks say what this server *allows*: limits on size,
remote code, and which models and data a job may read. Every refusal is a 422 naming the field
(`teacher`, `student`, `dataset.source`, `max_steps`, ...), so the client can point at the line
of the user's file. Local sources are rewritten to the resolved absolute path that was checked,
so the worker opens exactly what was allowed, whatever its working directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy.orm import Session

# core.data is torch-free at import (torch only under TYPE_CHECKING): the same suffixes and
# row formats the worker reads with.
from core.data import FILE_SUFFIXES, MissingColumn, parse_row
from core.datafiles import DataFileRefused, dataset_files, open_data_file
from core.errors import AmidError
from core.settings import DatasetSettings, DistillSettings
from store.artifacts import get_artifact_store
from store.config import ServiceConfig
from store.files import FILE_REF, FileNotFound, get_file
from store.jobs import JobNotFound, get_job
from store.models import UploadedFile
from store.states import JobStatus

# `name` or `org/name` as the Hugging Face hub spells them: no leading dot, no `..`, one slash.
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
HUB_ID = re.compile(rf"{_HUB_PART}(/{_HUB_PART})?")
JOB_REF = re.compile(r"job:([0-9a-f]{32})")
_JOB_PREFIX = "job:"
_SURROGATE = re.compile("[\ud800-\udfff]")
# How much of a local dataset file is read at submission: enough for a first row, never the file.
DATA_HEAD_BYTES = 1 << 20
# Settings of a job's own reading of its rows (as opposed to whether the file can be read).
_JOB_DATA_FIELDS = ("dataset.format", "dataset.fields")


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
    # Checked before anything is encoded: a lone surrogate cannot even be written as JSON.
    _refuse_unstorable(settings.model_dump(by_alias=True), "")
    public = settings.public_dict()
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
    if settings.generation.max_new_tokens > config.max_length_limit:
        # A length like max_length: tokens generated per eval prompt, bounded by the same limit.
        raise SettingRefused(
            f"generation.max_new_tokens {settings.generation.max_new_tokens} exceeds this "
            f"server's length limit of {config.max_length_limit}",
            field="generation.max_new_tokens",
        )
    if settings.trust_remote_code and not config.allow_trust_remote_code:
        raise SettingRefused(
            "trust_remote_code is not allowed on this server", field="trust_remote_code"
        )
    base = cwd or Path.cwd()
    for name in ("teacher", "student"):
        if public[name] is not None:  # an SFT job has no teacher
            public[name] = _check_model(
                session, public[name], name, config=config, owner=owner, base=base
            )
    dataset = public["dataset"]
    if upload_ref := FILE_REF.fullmatch(dataset["source"]):
        upload = _uploaded(session, upload_ref, "dataset", "dataset.source", owner)
        _check_uploaded_rows(upload, settings.dataset)
        return public
    dataset["source"] = _check_source(
        dataset["source"], "dataset.source", config.data_roots, config, base
    )
    if Path(dataset["source"]).is_absolute():  # a checked local path; a hub id never is
        _check_dataset_head(Path(dataset["source"]), settings.dataset, config.data_roots)
    # The other data a job reads passes the same rules as its training data.
    for name, extra in public["eval_datasets"].items():
        extra["source"] = _check_source(
            extra["source"], f"eval_datasets.{name}.source", config.data_roots, config, base
        )
    if public["lm_dataset"] is not None:
        public["lm_dataset"] = _check_local_source(
            public["lm_dataset"], "lm_dataset", config.data_roots, base
        )
    return public


def _uploaded(
    session: Session, ref: re.Match[str], purpose: str, field: str, owner: str | None
) -> UploadedFile:
    """The caller's upload that a `file:<id>` names, of the kind the field takes."""
    try:
        upload = get_file(session, ref.group(1), owner)
    except FileNotFound as exc:
        raise SettingRefused(f"{ref.group(0)}: no such file", field=field) from exc
    if upload.purpose != purpose:
        raise SettingRefused(
            f"{ref.group(0)} was uploaded as a {upload.purpose}, not a {purpose}", field=field
        )
    return upload


def _check_uploaded_rows(upload: UploadedFile, dataset: DatasetSettings) -> None:
    # The file's type and first row were checked at upload; what depends on this job (the
    # format asked for, the column renames) is checked against the same first row here.
    if upload.filename.endswith(".parquet"):
        return
    head = get_artifact_store().read_head(upload.uri, DATA_HEAD_BYTES)
    _check_first_row(Path(upload.filename), head.lstrip(), upload.size <= DATA_HEAD_BYTES, dataset)


def check_dataset_upload(path: Path, label: str) -> None:
    """Refuse an uploaded dataset no job could read (its type, emptiness, a first row that is no
    JSON object); the messages name `label`, not the server's copy. Which format the rows are
    is a job's question (its `format` and `fields`), checked when a job names the file."""
    try:
        # The server's own copy of the upload: its folder is the only root it may be read from.
        _check_dataset_head(path, DatasetSettings(source=label), [path.parent])
    except SettingRefused as exc:
        if exc.field in _JOB_DATA_FIELDS:
            return
        raise SettingRefused(exc.message.replace(str(path), label), field="body") from exc


def _refuse_unstorable(value: Any, where: str) -> None:
    # Postgres text and JSONB cannot hold U+0000, and no UTF-8 text holds an unpaired surrogate
    # (JSON's "\ud800" decodes to one): refuse them here, naming the field, rather than fail
    # with a 500 when the settings are encoded or inserted.
    if isinstance(value, str):
        if "\x00" in value:
            raise SettingRefused("must not contain a NUL character", field=where or None)
        if _SURROGATE.search(value):
            raise SettingRefused(
                "must be valid Unicode text (an unpaired surrogate is not)", field=where or None
            )
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_unstorable(key, where)
            _refuse_unstorable(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for item in value:
            _refuse_unstorable(item, where)


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
    if upload_ref := FILE_REF.fullmatch(source):
        _uploaded(session, upload_ref, "model", field, owner)
        return source
    return _check_source(source, field, config.model_roots, config, base)


def _check_source(
    source: str, field: str, roots: list[Path], config: ServiceConfig, base: Path
) -> str:
    """A local path under `roots` (returned resolved) or an allowed hub id (returned as is)."""
    path, explicit = _as_path(source, field, base)
    # `models/missing` where ./models is a local directory means a missing local path, not
    # a hub id of an org called "models".
    looks_local = "/" in source and _probe((base / source.split("/", 1)[0]).is_dir)
    if explicit or looks_local or _probe(path.exists):
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


def _check_local_source(source: str, field: str, roots: list[Path], base: Path) -> str:
    """A local file under `roots`, returned resolved (no hub id is accepted here)."""
    path, _ = _as_path(source, field, base)
    return str(_under_roots(path, roots, field))


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
    try:
        path = Path(source).expanduser()
    except RuntimeError as exc:  # `~name/...` of a user this machine does not have
        raise SettingRefused(f"{source!r}: no such home directory", field=field) from exc
    return (path if path.is_absolute() else base / path), explicit


def _probe(check: Callable[[], bool]) -> bool:
    """A filesystem test that answers False where the system cannot even look (a name too long
    for it): such a name is no local path, and an error here must not become a 500."""
    try:
        return check()
    except OSError:
        return False


def _under_roots(path: Path, roots: list[Path], field: str) -> Path:
    # resolve() follows every symlink and removes `..`, so a link or a climb out of a root is
    # judged by where it really lands.
    try:
        resolved = path.resolve()
    except RuntimeError as exc:  # a link that leads back to itself (Python < 3.13)
        raise SettingRefused(f"{path.name} is a symbolic link loop", field=field) from exc
    # The operator's setting that would let the path through, and the user's way round it.
    setting = "AMID_DATA_ROOTS" if field.startswith("dataset") else "AMID_MODEL_ROOTS"
    remedy = (
        f"the server's {setting} lists the allowed directories; or upload it: amid files upload"
    )
    if not roots:
        raise SettingRefused(f"local paths are not allowed on this server ({remedy})", field=field)
    if not any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        raise SettingRefused(
            f"path is outside the directories this server allows for {field} ({remedy})",
            field=field,
        )
    try:
        exists = resolved.exists()
    except OSError as exc:  # a name too long for the filesystem, and the like
        name = resolved.name if len(resolved.name) <= 64 else resolved.name[:64] + "..."
        raise SettingRefused(f"{name} cannot be looked up ({exc.strerror})", field=field) from exc
    if not exists:
        raise SettingRefused(f"{resolved} does not exist", field=field)
    return resolved


def _check_dataset_head(source: Path, dataset: DatasetSettings, roots: list[Path]) -> None:
    """Refuse a local dataset the worker could not read, judged from its first row only.

    Every file of a directory must pass the reading rules of `core.datafiles` (a regular file
    inside the data roots); beyond that the check is cheap on purpose (at most DATA_HEAD_BYTES
    of one file): a file that is missing its rows, is not the type its name says, or whose first
    row fits no format fails here, at submission, rather than on a GPU after the models have
    loaded.
    """
    field = "dataset.source"
    try:
        path = dataset_files(source, roots)[0]
    except DataFileRefused as exc:
        raise SettingRefused(exc.message, field=field) from exc
    if path.suffix not in FILE_SUFFIXES:
        raise SettingRefused(
            f"unsupported file type {path.suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}",
            field=field,
        )
    try:
        with open_data_file(path) as handle:
            head = handle.read(DATA_HEAD_BYTES)
            size = handle.seek(0, 2)
            tail = b""
            if path.suffix == ".parquet" and size >= 8:
                handle.seek(size - 4)
                tail = handle.read(4)
    except OSError as exc:
        raise SettingRefused(f"{path} cannot be read ({exc.strerror or exc})", field=field) from exc
    if not head.strip():
        raise SettingRefused(f"{path} is empty", field=field)
    if path.suffix == ".parquet":
        if not (head.startswith(b"PAR1") and tail == b"PAR1"):
            raise SettingRefused(f"{path} is not a Parquet file", field=field)
        return
    _check_first_row(path, head.lstrip(), size <= DATA_HEAD_BYTES, dataset)


def _check_first_row(path: Path, head: bytes, whole: bool, dataset: DatasetSettings) -> None:
    field = "dataset.source"
    if path.suffix == ".json" and head[:1] not in (b"[", b"{"):
        raise SettingRefused(f"{path} is not JSON (an array of rows, or JSON lines)", field=field)
    line, newline, _ = head.partition(b"\n")
    if path.suffix == ".json" and head[:1] == b"[":
        return  # an array's first element is not cheap to cut out; the worker reports it
    if not (newline or whole) or dataset.skip_malformed:
        return  # a first line longer than the head, or rows the run is told to skip
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if path.suffix == ".json":
            return  # one JSON document over several lines; the worker parses it whole
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.msg
        raise SettingRefused(
            f"the first row of {path.name} is not valid JSON ({reason})", field=field
        ) from exc
    if path.suffix == ".json" and isinstance(row, dict) and isinstance(row.get("data"), list):
        return  # {"data": [...]}: rows inside one object
    if not isinstance(row, dict):
        raise SettingRefused(f"the first row of {path.name} is not a JSON object", field=field)
    _check_row_format(path, row, dataset)


def _check_row_format(path: Path, row: dict[str, object], dataset: DatasetSettings) -> None:
    # The worker's own reading of a row (renames, format detection, required fields).
    try:
        parse_row(row, dataset, dataset.format, None)
    except MissingColumn as exc:
        raise SettingRefused(f"first row of {path.name}: {exc}", field="dataset.fields") from exc
    except AmidError as exc:  # no format fits the row's keys
        raise SettingRefused(
            f"first row of {path.name}: {exc.message}", field="dataset.format"
        ) from exc
    except ValueError as exc:
        raise SettingRefused(
            f"the first row of {path.name} does not fit its format: {exc}",
            field="dataset.format",
        ) from exc
