"""`lipverify vnncomp`: one VNN-COMP instance to a result file, or a whole `instances.csv`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lipverify.errors import InputError, LipverifyError

if TYPE_CHECKING:
    from lipverify.vnncomp.runner import RunOptions

# Seconds kept back from the time limit so the result file is written before the harness's kill.
SAFETY_SECONDS = 1.0


class InstanceError(LipverifyError):
    """The instance could not be run (its message is the runner's one-line reason)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "vnncomp", help="Run a VNN-COMP instance (ONNX + VNN-LIB) or a whole instances.csv.",
        description="One instance: `lipverify vnncomp ONNX VNNLIB --timeout T --out RESULT` "
                    "writes sat (with a counterexample checked by onnxruntime), unsat, "
                    "unknown, timeout or error. A folder: `lipverify vnncomp --instances "
                    "DIR/instances.csv --results results.csv` (resumable).")
    p.add_argument("onnx", nargs="?", help="The network (.onnx).")
    p.add_argument("vnnlib", nargs="?", help="The property (.vnnlib or .vnnlib.gz).")
    p.add_argument("--timeout", type=float, default=None,
                   help="Seconds for one instance (default 60); with --instances, a cap on "
                        "each row's own timeout.")
    p.add_argument("--out", default=None, help="Result file of one instance.")
    p.add_argument("--instances", default=None, help="A competition instances.csv to run.")
    p.add_argument("--results", default=None,
                   help="Results CSV for --instances (appended to; rows already there are "
                        "skipped).")
    p.add_argument("--result-dir", default=None,
                   help="With --instances: also write each instance's result file here.")
    p.add_argument("--category", default=None,
                   help="Benchmark category for the results CSV (default: the folder name).")
    p.add_argument("--prepare", action="store_true",
                   help="Only check that ONNX and VNNLIB load and fit each other (warms caches).")
    p.add_argument("--backends", default="",
                   help="Comma-separated backends to use (default: every available one).")
    p.add_argument("--no-isolate", action="store_true",
                   help="Run backends in this process (deadlines are then only cooperative).")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="Torch device for the network.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.set_defaults(run=run)


def seconds_since_process_start() -> float:
    """How long this process has run (Linux `/proc`; 0 where unknown): imports count too."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - int(stat[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _run_options(args: argparse.Namespace, timeout: float) -> RunOptions:
    from lipverify.vnncomp.runner import RunOptions

    names = tuple(n.strip() for n in args.backends.split(",") if n.strip())
    return RunOptions(timeout=timeout, backends=names,
                      disabled=tuple(getattr(args, "disable_backend", []) or ()),
                      isolate=not args.no_isolate, device=args.device)


def _run_one(args: argparse.Namespace, start: float) -> int:
    from lipverify.vnncomp.results import VnncompResult, write_result
    from lipverify.vnncomp.runner import run_instance

    if args.out is None:
        raise InputError("--out RESULT is required for one instance")
    timeout = args.timeout if args.timeout is not None else 60.0
    if not timeout > 0:
        write_result(args.out, VnncompResult.ERROR)
        raise InputError(f"--timeout must be positive, got {timeout}")
    # Until an answer exists, a run killed by the harness has timed out.
    write_result(args.out, VnncompResult.TIMEOUT)
    # The competition's clock started with the process: interpreter start and imports count.
    used = max(time.monotonic() - start, seconds_since_process_start())
    budget = max(timeout - SAFETY_SECONDS - used, 0.1)
    answer = run_instance(args.onnx, args.vnnlib, _run_options(args, budget))
    cex = answer.counterexample
    write_result(args.out, answer.result, cex.x if cex else None, cex.y if cex else None)
    if answer.result == VnncompResult.ERROR:
        raise InstanceError(answer.message)
    print(f"{answer.result.value} ({answer.seconds:.2f}s"
          f"{', ' + answer.backend if answer.backend else ''})")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from lipverify.vnncomp.runner import prepare

    prepared = prepare(args.onnx, args.vnnlib, args.device, load=True)
    print(f"ok: {prepared.spec.num_inputs} inputs, {prepared.spec.num_outputs} outputs, "
          f"{len(prepared.spec.cases)} input box(es)")
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from lipverify.vnncomp.batch import BatchOptions, run_batch

    if args.results is None:
        raise InputError("--results RESULTS.csv is required with --instances")
    options = BatchOptions(run=_run_options(args, 60.0), category=args.category,
                           max_timeout=args.timeout,
                           result_dir=Path(args.result_dir) if args.result_dir else None,
                           progress=not args.no_progress)
    rows = run_batch(args.instances, args.results, options)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.result.value] = counts.get(row.result.value, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing new to run"
    print(f"{len(rows)} instance(s) run: {summary}; results in {args.results}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    start = time.monotonic()
    if args.instances is not None:
        if args.onnx or args.vnnlib:
            raise InputError("give either ONNX VNNLIB or --instances, not both")
        return _run_batch(args)
    if not (args.onnx and args.vnnlib):
        if args.out is not None:
            from lipverify.vnncomp.results import VnncompResult, write_result

            write_result(args.out, VnncompResult.ERROR)
        raise InputError("give ONNX VNNLIB (one instance) or --instances CSV")
    if args.prepare:
        return _run_prepare(args)
    return _run_one(args, start)
