"""The `--lower` and `--parameters` modes of `lipverify lipschitz` (options and output)."""

from __future__ import annotations

import argparse
import json

import numpy as np

from lipverify.api import LowerLipschitzReport, lower_lipschitz, parameter_lipschitz
from lipverify.errors import InputError
from lipverify.network.network import Network

# Entries of an input shown in text output before numpy summarises it (--json has them all).
PRINT_THRESHOLD = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of both modes."""
    lower = p.add_argument_group("lower Lipschitz constant (distance preservation, L2 only)")
    lower.add_argument("--lower", action="store_true",
                       help="Instead of upper bounds: a certified c with ||f(x) - f(x')|| >= "
                            "c ||x - x'|| (residual blocks 1 - Lip(g), invertible layers their "
                            "smallest singular value) and the smallest ratio a search finds.")
    lower.add_argument("--claim", type=float, default=None, metavar="C",
                       help="Search for a pair x, x' with ||f(x) - f(x')|| < C ||x - x'|| and "
                            "print it (implies --lower).")
    params = p.add_argument_group("Lipschitz constant in the parameters (dense feed-forward)")
    params.add_argument("--parameters", action="store_true",
                        help="Instead of upper bounds: bound ||f(x; t) - f(x; t')||_2 / "
                             "||t - t'||_2 over inputs ||x||_2 <= R and weights t, t' within D "
                             "of the model's, next to a sampled lower bound.")
    params.add_argument("--input-radius", type=float, default=None, metavar="R",
                        help="With --parameters: every input has ||x||_2 <= R (for [0, 1]^n "
                             "use sqrt(n)).")
    params.add_argument("--param-radius", type=float, default=None, metavar="D",
                        help="With --parameters: both weight vectors lie within D (L2, all "
                             "weights and biases together) of the model's.")


def selected(args: argparse.Namespace) -> bool:
    """True when one of the modes is asked for (else the ordinary upper-bound table runs)."""
    lower = args.lower or args.claim is not None
    if lower and args.parameters:
        raise InputError("--lower/--claim and --parameters are separate modes: give one")
    return lower or args.parameters


def run(args: argparse.Namespace, network: Network, data: np.ndarray | None) -> int:
    """Run the selected mode and print its result."""
    if args.parameters:
        return _parameters(args, network)
    if args.norm != "2":
        raise InputError("--lower works in L2 only (use --norm 2)")
    report = lower_lipschitz(network, claim=args.claim, data=data, seed=args.seed)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_lower(report)
    return 0


def _print_lower(report: LowerLipschitzReport) -> None:
    bound, found = report.bound, report.counterexample
    print("lower Lipschitz constant c (L2): ||f(x) - f(x')|| >= c ||x - x'||")
    print(f"{'certified lower bound':<24} {bound.value:>12.6g}")
    for i, layer in enumerate(bound.layers):
        note = f"  ({layer.reason})" if layer.reason else ""
        print(f"  {i:>3} {layer.kind:<18} {layer.value:>12.6g}  {layer.method}{note}")
    print(f"{'smallest ratio found':<24} {found.ratio:>12.6g}  (an upper bound on c; "
          f"{found.method})")
    if found.claim is None:
        return
    if found.violates:
        proof = "proven with rounding" if found.proven else "float64, not proven"
        print(f"claim c = {found.claim:g} is FALSE: this pair has ratio <= "
              f"{found.ratio_upper:.6g} ({proof}), ||x - x'|| = {found.distance:.3g}")
    else:
        print(f"claim c = {found.claim:g}: no violating pair found (best pair below)")
    opts = {"precision": 6, "threshold": PRINT_THRESHOLD}
    print(f"x  = {np.array2string(found.x.ravel(), **opts)}")
    print(f"x' = {np.array2string(found.x_prime.ravel(), **opts)}")


def _parameters(args: argparse.Namespace, network: Network) -> int:
    if args.input_radius is None or args.param_radius is None:
        raise InputError("--parameters needs --input-radius R and --param-radius D")
    report = parameter_lipschitz(network, args.input_radius, args.param_radius, seed=args.seed)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    bound, sampled = report.bound, report.sampled
    print(f"Lipschitz constant in the parameters (L2): ||f(x; t) - f(x; t')|| / ||t - t'|| "
          f"for ||x|| <= {bound.input_radius:g}, t, t' within {bound.param_radius:g} of the "
          f"{bound.num_parameters} weights")
    print(f"{'upper bound (sound)':<24} {bound.value:>12.6g}")
    print(f"{'sampled lower bound':<24} {sampled.value:>12.6g}  ({sampled.method})")
    print(f"{'ratio':<24} {report.ratio:>12.3f}")
    print(f"  {'layer':>5} {'||W||':>10} {'||input||':>10} {'Lip after':>10} {'factor':>10}")
    for f in bound.layers:
        print(f"  {f.index:>5} {f.weight_norm:>10.4g} {f.input_norm:>10.4g} "
              f"{f.suffix_lipschitz:>10.4g} {f.factor:>10.4g}")
    return 0
