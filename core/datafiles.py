"""The rules for reading a local dataset, in one place: the API applies them when a job is
submitted, the worker again when it opens each file.

Every file of a dataset (the file itself, or each data file of a directory) must be a regular
file (a FIFO or a device would block the reader or never end) whose resolved path lies inside the
allowed roots (a symlink out of them is judged by where it lands). Both are decided from `stat`,
without opening anything; a file is then opened non-blocking and checked again on the open
descriptor, so a file swapped for a FIFO in between cannot block the reader either.

Torch-free: the API imports this module.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

from core.errors import AmidError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

# The roots the current run may read data under; None: anywhere (`amid distill` on one's own
# machine). The worker sets them from AMID_DATA_ROOTS for the job it runs.
_allowed_roots: ContextVar[tuple[Path, ...] | None] = ContextVar("allowed_roots", default=None)


class DataFileRefused(AmidError):
    """A dataset file that must not be read: not a regular file, or outside the allowed roots."""

    status_code = 422

    def __init__(self, message: str) -> None:
        super().__init__(message, field="dataset.source")


@contextmanager
def within_roots(roots: Sequence[Path]) -> Iterator[None]:
    """Datasets read inside this block must lie under `roots`."""
    token = _allowed_roots.set(tuple(root.expanduser().resolve() for root in roots))
    try:
        yield
    finally:
        _allowed_roots.reset(token)


def allowed_roots() -> tuple[Path, ...] | None:
    return _allowed_roots.get()


def check_data_file(path: Path, roots: Sequence[Path] | None) -> None:
    """Refuse `path` unless it is a regular file inside `roots` (None: no roots to respect)."""
    try:
        mode = path.stat().st_mode  # follows links; opens nothing
        resolved = path.resolve(strict=True)
    except RuntimeError as exc:  # a link that leads back to itself (Python < 3.13)
        raise DataFileRefused(f"{path.name} is a symbolic link loop") from exc
    except OSError as exc:
        raise DataFileRefused(f"{path} cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(mode):
        raise DataFileRefused(f"{path} is not a regular file (a FIFO, device or directory)")
    if roots is not None and not any(resolved.is_relative_to(root) for root in roots):
        raise DataFileRefused(
            f"{path.name} leads outside the directories this server allows for datasets"
        )


def dataset_files(source: Path, roots: Sequence[Path] | None) -> list[Path]:
    """The data files of `source` (a file, or a directory's files with a data suffix), each
    checked by `check_data_file`. A directory without any is refused."""
    resolved_roots = None if roots is None else [r.expanduser().resolve() for r in roots]
    if source.is_dir():
        try:
            files = sorted(p for p in source.iterdir() if p.suffix in FILE_SUFFIXES)
        except OSError as exc:
            raise DataFileRefused(f"{source} cannot be listed ({exc.strerror})") from exc
        if not files:
            raise DataFileRefused(f"no {'/'.join(FILE_SUFFIXES)} files in the directory {source}")
    else:
        files = [source]
    for path in files:
        check_data_file(path, resolved_roots)
    return files


def open_data_file(path: Path, mode: str = "rb", encoding: str | None = None) -> IO[Any]:
    """Open a dataset file for reading under the rules above; never blocks on a FIFO."""
    check_data_file(path, allowed_roots())
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise DataFileRefused(f"{path} is not a regular file (a FIFO, device or directory)")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, mode, encoding=encoding)
    except BaseException:
        os.close(descriptor)
        raise
