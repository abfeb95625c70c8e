"""`lipverify lipschitz MODEL`: global Lipschitz upper bounds next to an empirical lower bound."""

from __future__ import annotations

import argparse
import json

from lipverify.api import lipschitz
from lipverify.cli import lipschitz_modes
from lipverify.cli.common import add_model_args, build_backends, load_model
from lipverify.config import RunConfig
from lipverify.data import load_data
from lipverify.network.load import check_inputs


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "lipschitz", help="Global Lipschitz upper bounds per backend and a lower bound.",
        description="Bound the global Lipschitz constant of MODEL with each backend and show an "
                    "empirical lower bound (the largest Jacobian spectral norm found over data "
                    "points, random points and gradient ascent) with the ratio of each bound "
                    "to it.")
    add_model_args(p, positional=True)
    p.add_argument("--backend", action="append", default=None, metavar="B",
                   help="A backend with a lipschitz() method (repeatable). Default: spectral.")
    p.add_argument("--norm", default="2", choices=("2", "inf"), help="Input norm.")
    p.add_argument("--data", default=None,
                   help="Data whose points seed the lower bound ('digits' or a .npz).")
    p.add_argument("--seed", type=int, default=0, help="Random seed of the lower bound search.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    lipschitz_modes.add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    shape = [int(v) for v in args.input_shape.split(",")] if args.input_shape else None
    config = RunConfig(model=args.model, arch=args.arch, input_shape=shape,
                       trust_pickle=args.trust_pickle)
    network = load_model(config, args.device)
    data = None
    if args.data is not None:
        data, _ = load_data(args.data, limit=256)
        check_inputs(network, data)
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
