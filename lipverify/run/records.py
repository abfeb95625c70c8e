"""Per-input JSONL records: written as they come, read back for resume and summaries.

Each line is one (input index, eps) record. A run killed mid-write leaves at most one broken last
line; `read_records` drops it (and `RecordWriter` truncates it) so a resumed run holds each
(index, eps) exactly once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lipverify.errors import InputError


def eps_key(eps: float) -> str:
    """The canonical string of an eps value (used as a dict key and in records)."""
    return repr(float(eps))


def read_records(path: Path) -> list[dict[str, Any]]:
    """All complete records in `path` (a missing file has none)."""
    if not path.exists():
        return []
    records = []
    with path.open("r", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # an interrupted final write
                break
            raise InputError(f"{path}:{number}: not a JSON record ({exc.msg})") from exc
    return records


def _truncate_partial_line(path: Path) -> None:
    """Cut a trailing line without newline (left by a killed run) so appends stay valid."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        fh.seek(cut)
        fh.truncate()


@dataclass
class RecordWriter:
    """Appends records to a JSONL file, flushed and fsynced after each batch."""

    path: Path
    resume: bool = False
    _fh: IO[str] | None = None

    def __enter__(self) -> RecordWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume:
            _truncate_partial_line(self.path)
            self._fh = self.path.open("a", encoding="utf-8")
        else:
            self._fh = self.path.open("w", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records and make them durable."""
        if self._fh is None:
            raise RuntimeError("use RecordWriter as a context manager")
        for record in records:
            self._fh.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite(value: float) -> float | str:
    """A float for JSON: finite values as they are, others as strings."""
    return value if math.isfinite(value) else str(value)
