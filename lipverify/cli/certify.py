"""`lipverify certify`: certified accuracy per eps and backend, one JSONL record per input."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lipverify.cli.common import add_model_args, build_backends, load_model
from lipverify.config import RunConfig, apply_overrides, load_config
from lipverify.data import load_data
from lipverify.errors import InputError
from lipverify.network.load import check_inputs
from lipverify.orchestrator import Mode
from lipverify.run.certify import CertifyJob, iter_records
from lipverify.run.records import RecordWriter, eps_key, read_records
from lipverify.run.summary import format_table, summarise
from lipverify.types import Norm


HELP = """\
Certify every input of a data set at one or more radii. Without arguments it runs the shipped
digits MLP on the held-out digits and prints certified accuracy per backend and the best per
input. Records (one JSON line per input and eps) are written as they come; --resume continues an
interrupted run.

examples:
  lipverify certify
  lipverify certify --model net.onnx --data images.npz --norm 2 --eps 0.1 0.25 --out r.jsonl
  lipverify certify --backends spectral,lipsdp --norm 2 --eps 0.5 --json
  lipverify certify configs/digits_mlp.yaml --set backends.lipsdp.solver=CLARABEL
"""


def _positive(what: str) -> Callable[[str], float]:
    """An argparse type: a positive finite number, errors naming `what`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from exc
        if not np.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be a positive finite number, got "
                                             f"{text}")
        return value
    return parse


_eps = _positive("eps")
_seconds = _positive("seconds")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `certify` and `compare`: config, model, data, norm, eps, backends."""
    p.add_argument("config", nargs="?", default=None,
                   help="A YAML run configuration (see `lipverify config --defaults`); "
                        "command-line options override it.")
    add_model_args(p)
    p.add_argument("--data", default=None,
                   help="'digits' (scikit-learn's bundled digits, test split) or a .npz with "
                        "arrays x (inputs) and y (integer labels). Default: digits.")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N inputs.")
    p.add_argument("--norm", default=None, choices=("2", "inf"), help="Perturbation norm "
                   "(default 2).")
    p.add_argument("--eps", type=_eps, nargs="+", default=None,
                   help="One or more radii. Default: 0.1 0.3 0.5.")
    p.add_argument("--backends", default=None,
                   help="Comma-separated backends, cheapest run first, or 'all'. Default: "
                        + ",".join(RunConfig().backends) + ".")
    p.add_argument("--mode", default=None, choices=("budget", "radius"),
                   help="budget: an input leaves the cascade once resolved at eps; radius: "
                        "every backend runs and the largest certified radius is kept.")
    p.add_argument("--batch-size", type=int, default=None, help="Inputs per cascade batch.")
    p.add_argument("--seed", type=int, default=None, help="Random seed (default 0).")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("certify", help="Certify a data set (certified accuracy per eps).",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--out", type=Path, default=None, help="JSONL file of per-input records.")
    p.add_argument("--resume", action="store_true",
                   help="Skip (input, eps) records already in --out and append the rest.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config key, e.g. backends.lipsdp.solver=CLARABEL.")
    p.add_argument("--json", action="store_true", help="Print the summary as JSON on stdout.")
    p.add_argument("--time-budget", type=_seconds, default=None, metavar="SECONDS",
                   help="Seconds per input, pooled over the run: the batch ending at input n "
                        "stops at n x SECONDS from the start; unresolved inputs are 'timeout'. "
                        f"Default {RunConfig().time_budget:g}.")
    p.add_argument("--time-total", type=_seconds, default=None, metavar="SECONDS",
                   help="Seconds for the whole run (default: no limit).")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    p.set_defaults(run=run)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run configuration: file (if any), then --set overrides, then explicit options."""
    config = load_config(args.config) if args.config else RunConfig()
    config = apply_overrides(config, args.set)
    explicit: dict = {}
    for key in ("data", "limit", "norm", "eps", "mode", "batch_size", "seed", "arch",
                "time_budget", "time_total"):
        if getattr(args, key, None) is not None:
            explicit[key] = getattr(args, key)
    if args.model is not None:
        explicit["model"] = str(args.model)
    if args.out is not None:
        explicit["out"] = str(args.out)
    if args.input_shape is not None:
        explicit["input_shape"] = [int(v) for v in args.input_shape.replace("x", ",").split(",")
                                   if v]
    if args.trust_pickle:
        explicit["trust_pickle"] = True
    if args.backends is not None:
        names = [n.strip() for n in args.backends.split(",") if n.strip()]
        explicit["backends"] = {n: config.backends.get(n) or {} for n in names}
    return dataclasses.replace(config, **explicit)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    config = resolve_config(args)
    out = Path(config.out) if config.out else None
    if args.resume and out is None:
        raise InputError("--resume needs --out")
    if config.limit is not None and config.limit <= 0:
        raise InputError("--limit must be positive")
    if not config.eps or any(not np.isfinite(e) or e <= 0 for e in config.eps):
        raise InputError(f"eps must be positive finite numbers, got {config.eps}")
    network = load_model(config, args.device)
    x, y = load_data(config.data, config.limit)
    check_inputs(network, x)
    if len(y) and (y.min() < 0 or y.max() >= network.num_outputs):
        raise InputError(f"labels must lie in [0, {network.num_outputs - 1}], got "
                         f"{y.min()}..{y.max()}")
    norm = Norm.parse(config.norm)
    backends = build_backends(args, config.backends, config.seed)
    previous = read_records(out) if args.resume and out else []
    done = frozenset((r["index"], r["eps_key"]) for r in previous)
    eps_values = tuple(float(e) for e in config.eps)
    job = CertifyJob(x, y, eps_values, norm, tuple(backends), Mode(config.mode),
                     config.batch_size, done, config.time_budget, config.time_total)
    keys = {eps_key(e) for e in eps_values}
    total = len(x) * len(eps_values) - sum(1 for _, k in done if k in keys)
    records = list(previous)
    bar = tqdm(total=max(total, 0), desc="certify", unit="input", file=sys.stderr,
               disable=args.no_progress)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(RecordWriter(out, resume=args.resume)) if out else None
        stack.callback(bar.close)
        def stage(name: str, inputs: int) -> None:
            bar.set_postfix_str(f"{name} on {inputs}")

        for batch in iter_records(network, job, progress=bar.update, stage=stage):
            records.extend(batch)
            if writer is not None:
                writer.write(batch)
    names_run = [b.name for b in backends]
    summary = summarise(records, eps_values, names_run)
    summary.update(norm=norm.value, backends=names_run, model=config.model)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary, names_run, norm.value, config.mode))
    return 0
