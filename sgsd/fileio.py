"""Atomic file writes: a file a user cares about is never half-written.

Each writer writes to a temporary file in the target's folder, flushes and
fsyncs it, then renames it over the target (atomic on POSIX). If anything
fails, the previous file is untouched and the temporary file is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from sgsd.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str = "w") -> Path:
    """Call `write(fh)` on a temporary file, then atomically move it to `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise UserError(
            f"cannot write {path}: {exc.strerror or exc}; the previous file is unchanged"
        ) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), mode="wb")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: Any) -> None:
    """Append one JSON line and fsync (append-only logs: a torn last line is skipped by `read_jsonl`)."""
    path = Path(path)
    line = json.dumps(row, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:  # a full disk: earlier lines are intact, a torn last one is skipped on read
        raise UserError(f"cannot append to {path}: {exc.strerror or exc}") from exc


def read_jsonl(path: str | os.PathLike, skip_torn_tail: bool = True) -> list[Any]:
    """Read a JSONL file. A malformed *last* line (a write cut by a kill) is skipped when
    `skip_torn_tail`; a malformed line elsewhere is an error naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise UserError(f"file not found: {path}") from exc
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if skip_torn_tail and i == len(lines):
                break
            raise UserError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
    return rows


def _remove_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
