"""VNN-COMP result files: the answer word, the counterexample format, the status mapping.

A result file's first line is `sat`, `unsat`, `unknown`, `timeout` or `error`; after `sat`
comes the counterexample as the competition writes it::

    sat
    (
    (X_0 0.5)
    ...
    (Y_0 -1.25)
    ...
    )
"""

from __future__ import annotations

import enum
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from lipverify.errors import InputError
from lipverify.types import Status

_PAIR = re.compile(r"\(\s*([XY])_(\d+)\s+([^\s()]+)\s*\)")


class VnncompResult(enum.Enum):
    """The competition's answer words."""

    SAT = "sat"
    UNSAT = "unsat"
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"
    ERROR = "error"


def result_from_status(status: Status) -> VnncompResult:
    """The answer for a status (VNN-LIB describes the violation, so verified means unsat)."""
    match status:
        case Status.VERIFIED:
            return VnncompResult.UNSAT
        case Status.FALSIFIED:
            return VnncompResult.SAT
        case Status.UNKNOWN:
            return VnncompResult.UNKNOWN
        case Status.TIMEOUT:
            return VnncompResult.TIMEOUT
        case Status.ERROR:
            return VnncompResult.ERROR
        case _:
            raise InputError(f"not a Status: {status!r}")


def format_counterexample(x: np.ndarray, y: np.ndarray) -> str:
    """The competition's `((X_0 v) ... (Y_0 v) ...)` text (exact float round trip)."""
    lines = ["("]
    lines += [f"(X_{i} {float(v)!r})" for i, v in enumerate(np.ravel(x))]
    lines += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(np.ravel(y))]
    lines.append(")")
    return "\n".join(lines) + "\n"


def parse_counterexample(text: str) -> tuple[np.ndarray, np.ndarray]:
    """`(x, y)` from counterexample text (with or without a leading `sat` line)."""
    values: dict[str, dict[int, float]] = {"X": {}, "Y": {}}
    for kind, index, value in _PAIR.findall(text):
        try:
            values[kind][int(index)] = float(value)
        except ValueError as exc:
            raise InputError(f"counterexample value {value!r} is not a number") from exc
    arrays = []
    for kind in ("X", "Y"):
        found = values[kind]
        if sorted(found) != list(range(len(found))):
            raise InputError(f"counterexample {kind} indices are not 0..{len(found) - 1}")
        arrays.append(np.array([found[i] for i in range(len(found))], dtype=np.float64))
    return arrays[0], arrays[1]


def result_text(result: VnncompResult, x: np.ndarray | None = None,
                y: np.ndarray | None = None) -> str:
    """The full content of a result file."""
    if result == VnncompResult.SAT:
        if x is None or y is None:
            raise InputError("a sat result needs its counterexample")
        return "sat\n" + format_counterexample(x, y)
    return f"{result.value}\n"


def write_result(path: str | Path, result: VnncompResult, x: np.ndarray | None = None,
                 y: np.ndarray | None = None) -> None:
    """Write a result file atomically (a reader never sees half a file)."""
    path = Path(path)
    text = result_text(result, x, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result(path: str | Path) -> tuple[VnncompResult, tuple[np.ndarray, np.ndarray] | None]:
    """The answer of a result file and its counterexample (for `sat`)."""
    text = Path(path).read_text(encoding="utf-8")
    first = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    try:
        result = VnncompResult(first)
    except ValueError as exc:
        raise InputError(f"{path}: first line {first!r} is not a VNN-COMP result") from exc
    return result, (parse_counterexample(text) if result == VnncompResult.SAT else None)
