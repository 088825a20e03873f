"""The dataset reading rules as the worker applies them: every file of a dataset directory is a
regular file inside the allowed roots, judged without opening it, so a FIFO never blocks the
reader and a symlink out of the roots is never read."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from core.data import DatasetUnreadable, read_rows
from core.datafiles import DataFileRefused, dataset_files, open_data_file, within_roots
from core.settings import DatasetSettings

ROW = '{"prompt": "p", "response": "r"}\n'


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"prompt": "secret", "response": "s"}\n')
    return data, outside


def _rows_within(source: Path, root: Path) -> list[object]:
    """Read every row under the roots, in a thread: a reader stuck on a FIFO fails the test."""
    rows: list[object] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            with within_roots([root]):
                rows.extend(read_rows(DatasetSettings(source=str(source))))
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which raises it
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading the dataset blocked"
    if errors:
        raise errors[0]
    return rows


def test_a_fifo_next_to_a_valid_file_is_refused_without_blocking(roots: tuple[Path, Path]) -> None:
    data, _ = roots
    directory = data / "mixed"
    directory.mkdir()
    (directory / "a.jsonl").write_text(ROW)
    os.mkfifo(directory / "b.jsonl")
    with pytest.raises(DataFileRefused, match=r"b\.jsonl is not a regular file"):
        _rows_within(directory, data)


def test_a_symlink_out_of_the_roots_inside_a_directory_is_refused(
    roots: tuple[Path, Path],
) -> None:
    data, outside = roots
    directory = data / "leaky"
    directory.mkdir()
    (directory / "a.jsonl").write_text(ROW)
    (directory / "b.jsonl").symlink_to(outside / "secret.jsonl")
    with pytest.raises(DataFileRefused, match="outside the directories"):
        _rows_within(directory, data)
    # A link that stays inside the roots is read like any file.
    (directory / "b.jsonl").unlink()
    (directory / "b.jsonl").symlink_to(directory / "a.jsonl")
    assert len(_rows_within(directory, data)) == 2


def test_a_single_file_is_held_to_the_same_rules(roots: tuple[Path, Path]) -> None:
    data, outside = roots
    link = data / "leak.jsonl"
    link.symlink_to(outside / "secret.jsonl")
    with pytest.raises(DataFileRefused, match="outside"):
        _rows_within(link, data)
    fifo = data / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataFileRefused, match="regular file"):
        open_data_file(fifo)


def test_without_roots_any_regular_file_is_read(roots: tuple[Path, Path]) -> None:
    # `amid distill` on one's own machine: no roots, but still no FIFO.
    data, outside = roots
    (data / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    assert dataset_files(data, None) == [data / "leak.jsonl"]
    with open_data_file(data / "leak.jsonl", "r", encoding="utf-8") as handle:
        assert "secret" in handle.read()


def test_a_directory_without_data_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataFileRefused, match=r"no \.jsonl"):
        dataset_files(tmp_path, None)
    with pytest.raises(DatasetUnreadable, match="no such file"):
        list(read_rows(DatasetSettings(source=str(tmp_path / "missing.jsonl"))))
