"""`lipverify vnncomp`: one VNN-COMP instance to a result file, or a whole `instances.csv`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lipverify.errors import InputError, LipverifyError

if TYPE_CHECKING:
    from lipverify.config import VnncompConfig
    from lipverify.vnncomp.runner import RunOptions

# Seconds kept back from the time limit so the result file is written before the harness's kill.
SAFETY_SECONDS = 1.5
# Where the network runs when neither --device nor a config says (None marks "not given").
DEFAULT_DEVICE = "cpu"


class InstanceError(LipverifyError):
    """The instance could not be run (its message is the runner's one-line reason)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "vnncomp", help="Run a VNN-COMP instance (ONNX + VNN-LIB) or a whole instances.csv.",
        description="One instance: `lipverify vnncomp ONNX VNNLIB --timeout T --out RESULT` "
                    "writes sat (with a counterexample checked by onnxruntime), unsat, "
                    "unknown, timeout or error. A folder: `lipverify vnncomp --instances "
                    "DIR/instances.csv --results results.csv` (resumable), or the batch a "
                    "YAML config describes: `lipverify vnncomp --config FILE.yaml` (flags given "
                    "as well override its values).")
    p.add_argument("onnx", nargs="?", help="The network (.onnx).")
    p.add_argument("vnnlib", nargs="?", help="The property (.vnnlib or .vnnlib.gz).")
    p.add_argument("--timeout", type=float, default=None,
                   help="Seconds for one instance (default 60); with --instances, a cap on "
                        "each row's own timeout.")
    p.add_argument("--out", default=None, help="Result file of one instance.")
    p.add_argument("--instances", default=None, help="A competition instances.csv to run.")
    p.add_argument("--config", default=None,
                   help="A YAML VNN-COMP batch config (instances, results, backends with "
                        "options, ...; see configs/vnncomp_*.yaml).")
    p.add_argument("--results", default=None,
                   help="Results CSV for --instances (appended to; rows already there are "
                        "skipped).")
    p.add_argument("--result-dir", default=None,
                   help="With --instances: also write each instance's result file here.")
    p.add_argument("--category", default=None,
                   help="Benchmark category for the results CSV (default: the folder name).")
    p.add_argument("--prepare", action="store_true",
                   help="Only check that ONNX and VNNLIB load and fit each other (warms caches).")
    p.add_argument("--backends", default=None,
                   help="Comma-separated backends to use (default: every available one).")
    p.add_argument("--no-isolate", action="store_true",
                   help="Run backends in this process (deadlines are then only cooperative).")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="Torch device for the network (default cpu).")
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


def _names(text: str | None) -> tuple[str, ...]:
    """Backend names of a comma-separated `--backends` value."""
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def _run_options(args: argparse.Namespace, timeout: float) -> RunOptions:
    from lipverify.vnncomp.runner import RunOptions

    return RunOptions(timeout=timeout, backends=_names(args.backends),
                      disabled=tuple(getattr(args, "disable_backend", []) or ()),
                      isolate=not args.no_isolate, device=args.device or DEFAULT_DEVICE)


def _batch_config(args: argparse.Namespace) -> VnncompConfig:
    """Build the batch to run: the `--config` file (if any) with the flags given laid over it."""
    from lipverify.config import VnncompConfig, load_vnncomp_config

    base = load_vnncomp_config(args.config) if args.config else None
    data = dataclasses.asdict(base) if base else {}
    flags = {"instances": args.instances, "results": args.results,
             "result_dir": args.result_dir, "category": args.category,
             "timeout": args.timeout, "device": args.device}
    data.update({key: value for key, value in flags.items() if value is not None})
    if args.backends is not None:  # the named backends, with the config's options for them
        sections = data.get("backends", {})
        data["backends"] = {name: sections.get(name, {}) for name in _names(args.backends)}
    if args.no_isolate:
        data["isolate"] = False
    data["disable"] = [*data.get("disable", []), *(getattr(args, "disable_backend", []) or [])]
    if data.get("results") is None:
        raise InputError("--results RESULTS.csv is required with --instances")
    return VnncompConfig(**data)


def _check_backends(config: VnncompConfig) -> None:
    """Fail before the first instance on an unknown backend or a bad option in the config."""
    from lipverify.backends.registry import BackendRegistry
    from lipverify.config import check_backend_options

    registry = BackendRegistry.from_entry_points(disabled=config.disable)
    check_backend_options(config.backends, registry.load)


def _run_one(args: argparse.Namespace, start: float) -> int:
    from lipverify.vnncomp.results import VnncompResult, write_result
    from lipverify.vnncomp.runner import run_instance
    from lipverify.vnncomp.worker import stop_fork_server

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
    # The answer is on disk: the console script may skip teardown, once the fork server (which
    # may still be importing torch) is gone.
    args.fast_exit = stop_fork_server
    if answer.result == VnncompResult.ERROR:
        raise InstanceError(answer.message)
    print(f"{answer.result.value} ({answer.seconds:.2f}s"
          f"{', ' + answer.backend if answer.backend else ''})")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from lipverify.vnncomp.runner import prepare

    prepared = prepare(args.onnx, args.vnnlib, args.device or DEFAULT_DEVICE, load=True)
    print(f"ok: {prepared.spec.num_inputs} inputs, {prepared.spec.num_outputs} outputs, "
          f"{len(prepared.spec.cases)} input box(es)")
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    from lipverify.vnncomp.batch import BatchOptions, run_batch
    from lipverify.vnncomp.runner import RunOptions

    config = _batch_config(args)
    _check_backends(config)
    run_options = RunOptions(timeout=60.0, backends=tuple(config.backends),
                             disabled=tuple(config.disable), isolate=config.isolate,
                             device=config.device, backend_options=config.backends)
    options = BatchOptions(run=run_options, category=config.category,
                           max_timeout=config.timeout,
                           result_dir=Path(config.result_dir) if config.result_dir else None,
                           progress=not args.no_progress)
    rows = run_batch(config.instances, config.results, options)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.result.value] = counts.get(row.result.value, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing new to run"
    print(f"{len(rows)} instance(s) run: {summary}; results in {config.results}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    start = time.monotonic()
    if args.instances is not None or args.config is not None:
        if args.onnx or args.vnnlib:
            raise InputError("give either ONNX VNNLIB or --instances / --config, not both")
        return _run_batch(args)
    if not (args.onnx and args.vnnlib):
        if args.out is not None:
            from lipverify.vnncomp.results import VnncompResult, write_result

            write_result(args.out, VnncompResult.ERROR)
        raise InputError("give ONNX VNNLIB (one instance) or --instances CSV")
    if args.prepare:
        return _run_prepare(args)
    return _run_one(args, start)
