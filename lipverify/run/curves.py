"""Lipschitz bounds over training: upper and lower bound curves across a folder of checkpoints.

For each checkpoint (sorted naturally by the numbers in the file names, so `epoch_3.pt` comes
before `epoch_10.pt`) the chosen backends' global upper bounds and one empirical lower bound
(`lipverify.lower_bounds.jacobian_lower_bound`, through `lipverify.api.lipschitz`) go to a CSV,
one row per (checkpoint, backend), appended and fsynced as each checkpoint finishes. A resumed
run skips checkpoints whose rows are all there (a killed run leaves at most a broken last line,
dropped on reading). `plot_curves` draws both curves against the step, as in studies of how
Lipschitz bounds evolve during training (e.g. around double descent).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipverify.api import lipschitz
from lipverify.backends.base import Verifier
from lipverify.errors import InputError
from lipverify.network.network import Network
from lipverify.types import Norm

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".onnx")
COLUMNS = ("checkpoint", "step", "backend", "upper", "lower", "ratio", "seconds", "skipped")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing runs of digits as numbers (`epoch_3` before `epoch_10`)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", name) if part)


def checkpoint_step(path: Path) -> int | None:
    """The last number in the file name's stem (the epoch or step), or None."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def find_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoint files (`CHECKPOINT_SUFFIXES`) directly in `folder`, naturally sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"checkpoint folder not found: {folder}")
    paths = [p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    if not paths:
        raise InputError(f"no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) in {folder}")
    return sorted(paths, key=lambda p: natural_key(p.name))


@dataclass(frozen=True)
class CurveRow:
    """One backend's bound on one checkpoint, next to that checkpoint's lower bound.

    `upper` is NaN (and `skipped` says why) when the backend could not bound the network.
    """

    checkpoint: str
    step: int
    backend: str
    upper: float
    lower: float
    seconds: float
    skipped: str = ""

    @property
    def ratio(self) -> float:
        """Upper over lower bound (inf when the lower bound is 0)."""
        return self.upper / self.lower if self.lower > 0 else math.inf

    def to_csv(self) -> list[str]:
        """The CSV fields (floats as `repr`: they read back exactly)."""
        return [self.checkpoint, str(self.step), self.backend, repr(self.upper),
                repr(self.lower), repr(self.ratio), repr(self.seconds), self.skipped]

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (NaN and inf as None)."""
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {"checkpoint": self.checkpoint, "step": self.step, "backend": self.backend,
                "upper": num(self.upper), "lower": num(self.lower), "ratio": num(self.ratio),
                "seconds": self.seconds, "skipped": self.skipped}

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> CurveRow:
        """Inverse of `to_csv`."""
        return cls(row["checkpoint"], int(row["step"]), row["backend"], float(row["upper"]),
                   float(row["lower"]), float(row["seconds"]), row.get("skipped") or "")


def read_rows(path: str | Path) -> list[CurveRow]:
    """The complete rows of a curves CSV (none if missing; a broken last line is dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # an interrupted final write
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is not None and tuple(reader.fieldnames) != COLUMNS:
        raise InputError(f"{path}: not a bounds-over-training CSV (columns {reader.fieldnames})")
    rows = []
    for number, row in enumerate(reader, 2):
        try:
            rows.append(CurveRow.from_csv(row))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}:{number}: unreadable row ({exc})") from exc
    return rows


def _append(path: Path, rows: Iterable[CurveRow]) -> None:
    """Append rows in one write (header first on a new file), flushed and fsynced."""
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        data = path.read_bytes()
        path.write_bytes(data[:data.rfind(b"\n") + 1])  # cut a broken last line
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(row.to_csv())
    with path.open("a", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def latest(rows: Iterable[CurveRow]) -> list[CurveRow]:
    """One row per (checkpoint, backend), the last written, in natural checkpoint order."""
    by_key = {(r.checkpoint, r.backend): r for r in rows}
    return sorted(by_key.values(), key=lambda r: (natural_key(r.checkpoint), r.backend))


def bound_curves(checkpoints: Sequence[Path], out_csv: str | Path,
                 load: Callable[[Path], Network], backends: Sequence[str | Verifier],
                 *, norm: str | Norm = "2", data: np.ndarray | None = None, seed: int = 0,
                 on_row: Callable[[CurveRow], None] | None = None) -> list[CurveRow]:
    """Bound every checkpoint not yet in `out_csv`; returns all rows (old and new).

    Args:
        checkpoints: the files, in the order of the curve (e.g. from `find_checkpoints`).
        out_csv: the CSV, created or appended to; a checkpoint is skipped when it already has
            a row for every backend (and only its missing backends run otherwise).
        load: turns a checkpoint file into a `Network` (the CLI passes its own loader).
        backends: names or instances with a `lipschitz()` method.
        norm: the input (and output) norm.
        data: points that seed the lower bound search.
        seed: the lower bound search's seed.
        on_row: called with each new row as it is written (progress output).

    """
    out_csv = Path(out_csv)
    names = [b if isinstance(b, str) else b.name for b in backends]
    rows = read_rows(out_csv)
    have: dict[str, set[str]] = {}
    for r in rows:
        have.setdefault(r.checkpoint, set()).add(r.backend)
    for index, path in enumerate(checkpoints):
        todo = [b for b, name in zip(backends, names, strict=True)
                if name not in have.get(path.name, set())]
        if not todo:
            continue
        report = lipschitz(load(path), todo, norm=norm, data=data, seed=seed)
        step = checkpoint_step(path)
        step = index if step is None else step
        new = [CurveRow(path.name, step, b.backend, float(b.value), report.lower_bound,
                        float(b.seconds)) for b in report.bounds]
        new += [CurveRow(path.name, step, name, math.nan, report.lower_bound, 0.0, reason)
                for name, reason in report.skipped.items()]
        _append(out_csv, new)
        rows += new
        for r in new:
            if on_row is not None:
                on_row(r)
    return latest(rows)


def plot_curves(rows: Sequence[CurveRow], out_png: str | Path, norm: str | Norm = "2") -> Path:
    """Upper bound per backend and the lower bound against the step (log scale), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(rows)
    out_png = Path(out_png)
    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in sorted({r.backend for r in rows}):
        mine = sorted((r for r in rows if r.backend == backend and math.isfinite(r.upper)),
                      key=lambda r: r.step)
        ax.plot([r.step for r in mine], [r.upper for r in mine], "o-", ms=3,
                label=f"{backend} (upper bound)")
    lower = sorted({r.step: r.lower for r in rows}.items())
    ax.plot([s for s, _ in lower], [v for _, v in lower], "s--", ms=3, color="tab:green",
            label="empirical lower bound")
    if all(v > 0 for r in rows for v in (r.upper, r.lower) if math.isfinite(v)):
        ax.set_yscale("log")
    ax.set(xlabel="checkpoint step",
           ylabel=f"global Lipschitz constant (L{Norm.parse(norm).value})",
           title="Lipschitz bounds over training")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
