"""A whole benchmark folder: the competition's `instances.csv` in, its results CSV out.

`instances.csv` has rows `onnx,vnnlib,timeout` (no header, paths relative to the CSV's folder).
The results CSV has the competition's columns, no header: `category, onnx, vnnlib, prepare
time, result, run time`. Rows are appended (and flushed) as instances finish; a row whose
`onnx,vnnlib` is already in the results file is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from lipverify.errors import InputError
from lipverify.vnncomp.results import VnncompResult, write_result
from lipverify.vnncomp.runner import InstanceResult, RunOptions, prepare, run_instance

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("category", "onnx", "vnnlib", "prepare_time", "result", "run_time")


@dataclass(frozen=True)
class Instance:
    """One row of `instances.csv`: paths as written, resolved against `root`."""

    onnx: str
    vnnlib: str
    timeout: float
    root: Path

    @property
    def onnx_path(self) -> Path:
        """The network file."""
        return self.root / self.onnx

    @property
    def vnnlib_path(self) -> Path:
        """The property file."""
        return self.root / self.vnnlib

    @property
    def result_name(self) -> str:
        """A file name for this instance's result file."""
        return f"{Path(self.onnx).stem}__{Path(self.vnnlib).stem}.result"


@dataclass(frozen=True)
class BatchRow:
    """One line of the results CSV."""

    category: str
    onnx: str
    vnnlib: str
    prepare_time: float
    result: VnncompResult
    run_time: float

    def cells(self) -> list[str]:
        """The CSV cells."""
        return [self.category, self.onnx, self.vnnlib, f"{self.prepare_time:.6f}",
                self.result.value, f"{self.run_time:.6f}"]


@dataclass(frozen=True)
class BatchOptions:
    """How to run a folder.

    Args:
        run: Options for each instance (its `timeout` is replaced by the CSV's).
        category: The first results column; default: the CSV's folder name.
        max_timeout: Cap on each instance's timeout (None: the CSV's timeouts).
        result_dir: Where to write each instance's result file (None: nowhere).
        progress: Show a progress bar.

    """

    run: RunOptions = RunOptions()
    category: str | None = None
    max_timeout: float | None = None
    result_dir: Path | None = None
    progress: bool = True
    limit: int | None = None


def read_instances(path: str | Path) -> list[Instance]:
    """The rows of an `instances.csv` (errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"instances file not found: {path}")
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        for number, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if len(cells) != 3:
                raise InputError(f"{path}:{number}: expected onnx,vnnlib,timeout, got "
                                 f"{len(cells)} columns")
            try:
                timeout = float(cells[2])
            except ValueError as exc:
                raise InputError(f"{path}:{number}: timeout {cells[2]!r} is not a number") \
                    from exc
            out.append(Instance(cells[0], cells[1], timeout, path.parent))
    return out


def read_results(path: str | Path) -> list[BatchRow]:
    """The rows of a results CSV written by `run_batch` (empty if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for number, cells in enumerate(csv.reader(fh), start=1):
            if not cells:
                continue
            try:
                rows.append(BatchRow(cells[0], cells[1], cells[2], float(cells[3]),
                                     VnncompResult(cells[4]), float(cells[5])))
            except (IndexError, ValueError) as exc:
                raise InputError(f"{path}:{number}: not a results row: {exc}") from exc
    return rows


def _timed_prepare(instance: Instance, device: str) -> float:
    start = time.monotonic()
    try:
        prepare(instance.onnx_path, instance.vnnlib_path, device, load=False)
    except Exception as exc:  # noqa: BLE001 - the run reports it as `error`
        log.debug("prepare failed: %s", exc)
    return time.monotonic() - start


def iter_batch(instances_csv: str | Path, results_csv: str | Path,
               options: BatchOptions | None = None) -> Iterator[tuple[Instance, BatchRow,
                                                                      InstanceResult]]:
    """Run the instances not yet in `results_csv`, appending one row each; yields as they end."""
    options = options or BatchOptions()
    instances = read_instances(instances_csv)[:options.limit]
    category = options.category or Path(instances_csv).resolve().parent.name
    done = {(r.onnx, r.vnnlib) for r in read_results(results_csv)}
    todo = [i for i in instances if (i.onnx, i.vnnlib) not in done]
    if len(todo) < len(instances):
        log.info("resuming: %d of %d instances already in %s", len(instances) - len(todo),
                 len(instances), results_csv)
    from tqdm import tqdm

    results_path = Path(results_csv)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(todo, unit="instance", disable=not options.progress, dynamic_ncols=True)
    with results_path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        for instance in bar:
            timeout = instance.timeout
            if options.max_timeout is not None:
                timeout = min(timeout, options.max_timeout)
            prep = _timed_prepare(instance, options.run.device)
            answer = run_instance(instance.onnx_path, instance.vnnlib_path,
                                  replace(options.run, timeout=timeout))
            row = BatchRow(category, instance.onnx, instance.vnnlib, prep, answer.result,
                           answer.seconds)
            writer.writerow(row.cells())
            fh.flush()
            if options.result_dir is not None:
                cex = answer.counterexample
                write_result(Path(options.result_dir) / instance.result_name, answer.result,
                             cex.x if cex else None, cex.y if cex else None)
            bar.set_postfix_str(f"{Path(instance.vnnlib).stem}: {answer.result.value}")
            yield instance, row, answer


def run_batch(instances_csv: str | Path, results_csv: str | Path,
              options: BatchOptions | None = None) -> list[BatchRow]:
    """Run a folder (resumable); the rows written by this call."""
    return [row for _, row, _ in iter_batch(instances_csv, results_csv, options)]
