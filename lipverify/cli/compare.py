"""`lipverify compare`: how tight each backend is, as a table, a CSV and PNG plots."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lipverify.cli.certify import add_run_args, resolve_config
from lipverify.cli.common import build_backends, load_model
from lipverify.comparison.collect import collect
from lipverify.comparison.report import markdown, write_report
from lipverify.data import load_data
from lipverify.network.load import check_inputs
from lipverify.types import Norm

DEFAULT_COMPARE_LIMIT = 100

HELP = """\
Run every selected backend on the same inputs (in radius mode) and write into --out:
summary.md (per backend: global and pairwise Lipschitz bounds, ratio to the best lower bound,
certified accuracy at each eps, median certified radius, time), radii.csv (every per-input
radius) and PNG plots (certified accuracy against eps, radius per input, bounds against the
lower bound).

examples:
  lipverify compare --out report/
  lipverify compare configs/digits_mlp.yaml --out report/
  lipverify compare --model net.onnx --data images.npz --eps 0.1 0.2 --out report/
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("compare", help="Compare bound tightness across backends (table, plots).",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--out", type=Path, required=True, help="Directory for the report.")
    p.set_defaults(run=run, resume=False, set=[])


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    out_dir = args.out
    args.out = None
    config = resolve_config(args)
    if config.limit is None:
        config = dataclasses.replace(config, limit=DEFAULT_COMPARE_LIMIT)
    network = load_model(config, args.device)
    x, y = load_data(config.data, config.limit)
    check_inputs(network, x)
    backends = build_backends(args, config.backends, config.seed)
    cmp = collect(network, x, y, backends, Norm.parse(config.norm), config.eps, config.seed)
    files = write_report(cmp, out_dir)
    print(markdown(cmp))
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0
