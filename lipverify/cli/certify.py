"""`lipverify certify`: certified accuracy per eps and backend, one JSONL record per input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lipverify.cli.common import add_model_args, load_model, select_backends
from lipverify.data import load_data
from lipverify.errors import InputError
from lipverify.network.load import check_inputs
from lipverify.orchestrator import Mode
from lipverify.run.certify import CertifyJob, iter_records
from lipverify.run.records import RecordWriter, eps_key, read_records
from lipverify.run.summary import format_table, summarise
from lipverify.types import Norm

DEFAULT_EPS = (0.1, 0.3, 0.5)
DEFAULT_BACKENDS = ("attack", "spectral", "lirpa", "local", "lipsdp", "l2prop", "alpha-crown")

HELP = """\
Certify every input of a data set at one or more radii. Without arguments it runs the shipped
digits MLP on the held-out digits and prints certified accuracy per backend and the best per
input. Records (one JSON line per input and eps) are written as they come; --resume continues an
interrupted run.

examples:
  lipverify certify
  lipverify certify --model net.onnx --data images.npz --norm 2 --eps 0.1 0.25 --out r.jsonl
  lipverify certify --backends spectral,lipsdp --norm 2 --eps 0.5 --json
"""


def _eps(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"eps must be a number, got {text!r}") from exc
    if not np.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"eps must be a positive finite number, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("certify", help="Certify a data set (certified accuracy per eps).",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's bundled digits, test split) or a .npz with "
                        "arrays x (inputs) and y (integer labels). Default: digits.")
    p.add_argument("--limit", type=int, default=None, help="Use only the first N inputs.")
    p.add_argument("--norm", default="2", choices=("2", "inf"), help="Perturbation norm.")
    p.add_argument("--eps", type=_eps, nargs="+", default=list(DEFAULT_EPS),
                   help=f"One or more radii. Default: {' '.join(map(str, DEFAULT_EPS))}.")
    p.add_argument("--backends", default=None,
                   help="Comma-separated backends, cheapest run first, or 'all'. Default: "
                        + ",".join(DEFAULT_BACKENDS) + " (those that support the problem).")
    p.add_argument("--mode", default="budget", choices=("budget", "radius"),
                   help="budget: an input leaves the cascade once resolved at eps; radius: "
                        "every backend runs and the largest certified radius is kept.")
    p.add_argument("--batch-size", type=int, default=256, help="Inputs per cascade batch.")
    p.add_argument("--out", type=Path, default=None, help="JSONL file of per-input records.")
    p.add_argument("--resume", action="store_true",
                   help="Skip (input, eps) records already in --out and append the rest.")
    p.add_argument("--json", action="store_true", help="Print the summary as JSON on stdout.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    if args.resume and args.out is None:
        raise InputError("--resume needs --out")
    if args.limit is not None and args.limit <= 0:
        raise InputError("--limit must be positive")
    network = load_model(args)
    x, y = load_data(args.data, args.limit)
    check_inputs(network, x)
    if len(y) and (y.min() < 0 or y.max() >= network.num_outputs):
        raise InputError(f"labels must lie in [0, {network.num_outputs - 1}]")
    norm = Norm.parse(args.norm)
    names = args.backends or ",".join(DEFAULT_BACKENDS)
    backends = select_backends(args, names, DEFAULT_BACKENDS)
    previous = read_records(args.out) if args.resume and args.out else []
    done = frozenset((r["index"], r["eps_key"]) for r in previous)
    job = CertifyJob(x, y, tuple(args.eps), norm, tuple(backends), Mode(args.mode),
                     args.batch_size, done)
    total = len(x) * len(args.eps) - sum(1 for i, k in done
                                         if k in {eps_key(e) for e in args.eps})
    records = list(previous)
    bar = tqdm(total=max(total, 0), desc="certify", unit="input", file=sys.stderr,
               disable=args.no_progress or not sys.stderr.isatty() and args.json)
    writer = RecordWriter(args.out, resume=args.resume) if args.out else None
    try:
        if writer is not None:
            writer.__enter__()
        for batch in iter_records(network, job, progress=bar.update):
            records.extend(batch)
            if writer is not None:
                writer.write(batch)
    finally:
        bar.close()
        if writer is not None:
            writer.__exit__()
    names_run = [b.name for b in backends]
    summary = summarise(records, args.eps, names_run)
    summary["norm"] = norm.value
    summary["backends"] = names_run
    summary["model"] = str(args.model)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary, names_run, norm.value))
    return 0
