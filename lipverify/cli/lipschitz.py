"""`lipverify lipschitz MODEL`: global Lipschitz upper bounds next to an empirical lower bound."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lipverify.api import lipschitz
from lipverify.cli import lipschitz_modes
from lipverify.cli.common import add_model_args, build_backends, load_model
from lipverify.config import RunConfig
from lipverify.data import load_data
from lipverify.errors import InputError
from lipverify.network.load import check_inputs
from lipverify.network.network import Network

if TYPE_CHECKING:
    from lipverify.run.curves import CurveRow


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "lipschitz", help="Global Lipschitz upper bounds per backend and a lower bound.",
        description="Bound the global Lipschitz constant of MODEL with each backend and show an "
                    "empirical lower bound (the largest Jacobian spectral norm found over data "
                    "points, random points and gradient ascent) with the ratio of each bound "
                    "to it.")
    add_model_args(p, positional=True, model_optional=True)
    p.add_argument("--backend", action="append", default=None, metavar="B",
                   help="A backend with a lipschitz() method (repeatable). Default: spectral.")
    p.add_argument("--norm", default="2", choices=("2", "inf"), help="Input norm.")
    p.add_argument("--data", default=None,
                   help="Data whose points seed the lower bound ('digits' or a .npz).")
    p.add_argument("--seed", type=int, default=0, help="Random seed of the lower bound search.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="Instead of MODEL: every checkpoint (.pt, .pth, .onnx) in DIR, in natural "
                        "order of the numbers in their names; writes upper and lower bound "
                        "curves (CSV, resumable, and PNG).")
    p.add_argument("--curves-out", default=None, metavar="CSV",
                   help="CSV of --checkpoints (default: DIR/lipschitz_curves.csv); the plot "
                        "goes next to it with suffix .png.")
    lipschitz_modes.add_arguments(p)
    p.set_defaults(run=run)


def _load(args: argparse.Namespace, model: str) -> Network:
    """`model` loaded as `lipverify lipschitz MODEL` loads it (--arch, --input-shape, ...)."""
    shape = [int(v) for v in args.input_shape.split(",")] if args.input_shape else None
    config = RunConfig(model=model, arch=args.arch, input_shape=shape,
                       trust_pickle=args.trust_pickle)
    return load_model(config, args.device)


def _data(args: argparse.Namespace, network: Network) -> np.ndarray | None:
    if args.data is None:
        return None
    data, _ = load_data(args.data, limit=256)
    check_inputs(network, data)
    return data


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    if args.checkpoints is not None:
        if args.model is not None:
            raise InputError("give either MODEL or --checkpoints DIR, not both")
        return run_curves(args)
    if args.model is None:
        raise InputError("give MODEL (or --checkpoints DIR)")
    network = _load(args, args.model)
    data = _data(args, network)
    if lipschitz_modes.selected(args):
        return lipschitz_modes.run(args, network, data)
    names = args.backend or ["spectral"]
    backends = build_backends(args, names, args.seed)
    report = lipschitz(network, backends, norm=args.norm, data=data, seed=args.seed)
    if args.json:
        print(json.dumps({
            "bounds": [{"backend": b.backend, "norm": b.norm.value, "value": b.value,
                        "sound": b.sound, "seconds": b.seconds,
                        "ratio_to_lower": report.ratio(b)} for b in report.bounds],
            "lower_bound": {"value": report.lower_bound, "method": report.lower_method},
            "skipped": dict(report.skipped),
        }, indent=2))
        return 0
    print(f"{'backend':<12} {'upper bound':>14} {'/ lower':>9} {'seconds':>9}  sound")
    for b in report.bounds:
        print(f"{b.backend:<12} {b.value:>14.6g} {report.ratio(b):>9.3f} {b.seconds:>9.3f}  "
              f"{'yes' if b.sound else 'no (estimate)'}")
    print(f"{'lower bound':<12} {report.lower_bound:>14.6g} {'':>9} {'':>9}  "
          f"({report.lower_method})")
    for name, reason in report.skipped.items():
        print(f"{name:<12} {'skipped':>14}: {reason}")
    return 0


def run_curves(args: argparse.Namespace) -> int:
    """`--checkpoints DIR`: bounds of every checkpoint to a CSV (as they come) and a PNG."""
    from lipverify.run.curves import bound_curves, find_checkpoints, plot_curves

    paths = find_checkpoints(args.checkpoints)
    out = Path(args.curves_out) if args.curves_out else Path(args.checkpoints) / \
        "lipschitz_curves.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = _data(args, _load(args, str(paths[0])))
    backends = build_backends(args, args.backend or ["spectral"], args.seed)

    def show(row: CurveRow) -> None:
        if not args.json:
            upper = "skipped" if math.isnan(row.upper) else f"{row.upper:.6g}"
            print(f"{row.checkpoint:<24} {row.step:>6} {row.backend:<12} {upper:>12} "
                  f"{row.lower:>12.6g} {row.ratio:>9.3f} {row.seconds:>8.2f}", flush=True)

    if not args.json:
        print(f"{'checkpoint':<24} {'step':>6} {'backend':<12} {'upper':>12} {'lower':>12} "
              f"{'ratio':>9} {'seconds':>8}", flush=True)
    rows = bound_curves(paths, out, lambda p: _load(args, str(p)), backends, norm=args.norm,
                        data=data, seed=args.seed, on_row=show)
    png = plot_curves(rows, out.with_suffix(".png"), args.norm)
    if args.json:
        print(json.dumps({"csv": str(out), "png": str(png),
                          "rows": [r.to_json() for r in rows]}, indent=2))
    else:
        print(f"wrote {out} ({len(rows)} rows) and {png}")
    return 0
