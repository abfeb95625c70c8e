"""LipSDP speed and tightness against a plain cvxpy formulation, a tight solve and the product.

For random 784-h-h-10 ReLU networks (weights ~ N(0, 1/fan_in), fixed seed) prints, measured in
this run: lipverify's LipSDP-Neuron (time, certified value), the plain formulation of the paper
(dense cp.Variable, `M << 0`, SCS; in a subprocess with a time and memory limit, "did not
finish" otherwise), a tight reference (SCS at tight tolerance on the reduced problem, also
capped), and the spectral product bound. Then the cascade table on the shipped MLP: inputs
certified under L2 by spectral alone and by spectral + lipsdp, per eps.

    .venv/bin/python benchmarks/bench_lipsdp.py [--sizes 64,128,256] [--plain-timeout 600]
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

SEED = 0
PLAIN_MEMORY_GB = 16
TIGHT_TOLERANCE = 1e-7


def weights_for(hidden, seed=SEED):
    rng = np.random.default_rng(seed)
    dims = [784, hidden, hidden, 10]
    return [rng.normal(0, 1 / np.sqrt(dims[i]), (dims[i + 1], dims[i])) for i in range(3)]


# ---- the plain formulation, run in a child process ---------------------------------------------
def plain_child(hidden, out_path):
    import cvxpy as cp

    w = weights_for(hidden)
    n0, n = 784, 2 * hidden
    a = np.zeros((n, n0 + n))
    a[:hidden, :n0] = w[0]
    a[hidden:, n0:n0 + hidden] = w[1]
    b = np.hstack([np.zeros((n, n0)), np.eye(n)])
    lam = cp.Variable(n, nonneg=True)
    rho = cp.Variable(nonneg=True)
    t = cp.diag(lam)
    q = cp.bmat([[np.zeros((n, n)), t], [t, -2 * t]])  # ReLU: alpha = 0, beta = 1
    ab = np.vstack([a, b])
    e_last = np.zeros((n0 + n, n0 + n))
    e_last[-hidden:, -hidden:] = w[2].T @ w[2]
    e0 = np.zeros((n0 + n, n0 + n))
    e0[:n0, :n0] = np.eye(n0)
    m = ab.T @ q @ ab + e_last - rho * e0
    start = time.perf_counter()
    prob = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    prob.solve(solver="SCS", eps_abs=1e-6, eps_rel=1e-6)
    with open(out_path, "w") as fh:
        json.dump({"value": math.sqrt(rho.value), "status": prob.status,
                   "seconds": time.perf_counter() - start}, fh)


def tight_child(hidden, out_path):
    from lipverify.sdp.assembly import Form, assemble
    from lipverify.sdp.chain import Chain, power_of_two_scales, reduce_input
    from lipverify.sdp.check import certify_multipliers
    from lipverify.sdp.solve import Solver, solve_cvxpy

    w = weights_for(hidden)
    relu = tuple((np.zeros(hidden), np.ones(hidden)) for _ in range(2))
    scaled, exps = power_of_two_scales(Chain(tuple(w[:2]), relu, w[2]))
    start = time.perf_counter()
    raw = solve_cvxpy(assemble(reduce_input(scaled), Form.NEURON), Solver.SCS, TIGHT_TOLERANCE,
                      None)
    checked = certify_multipliers(assemble(scaled), raw.t[1:], raw.t[0])
    scale = 2.0 ** sum(exps)
    with open(out_path, "w") as fh:
        json.dump({"value": math.sqrt(checked.rho) * scale, "status": raw.status,
                   "raw": math.sqrt(max(raw.t[0], 0)) * scale, "iterations": raw.iterations,
                   "seconds": time.perf_counter() - start}, fh)


def _limits():
    limit = PLAIN_MEMORY_GB * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_children(kinds, hidden, timeouts):
    """Run each of `kinds` in its own subprocess (concurrently) with a time and memory limit."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for kind in kinds:
            out = os.path.join(tmp, f"{kind}.json")
            cmd = [sys.executable, __file__, "--child", kind, "--hidden", str(hidden), "--out",
                   out]
            procs[kind] = (subprocess.Popen(cmd, preexec_fn=_limits, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True,
                                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}),
                           out, time.perf_counter())
        results = {}
        for kind, (proc, out, start) in procs.items():
            left = max(timeouts[kind] - (time.perf_counter() - start), 1.0)
            try:
                _, err = proc.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                results[kind] = {"dnf": f"did not finish ({timeouts[kind]:.0f} s limit)"}
                continue
            if proc.returncode != 0 or not os.path.exists(out):
                tail = (err.strip().splitlines() or ["?"])[-1]
                why = "out of memory" if "MemoryError" in err or "alloc" in tail else tail
                results[kind] = {"dnf": f"did not finish ({why[:60]}, "
                                        f"{time.perf_counter() - start:.0f} s)"}
                continue
            with open(out) as fh:
                results[kind] = json.load(fh)
        return results


# ---- the table --------------------------------------------------------------------------------
def product_bound(w):
    """The spectral backend's sound product bound on the same network."""
    import torch

    from lipverify.backends.spectral import SpectralBackend
    from lipverify.network.extract import extract_layers
    from lipverify.network.network import Network
    from lipverify.types import Norm

    model = torch.nn.Sequential(torch.nn.Linear(784, w[0].shape[0]), torch.nn.ReLU(),
                                torch.nn.Linear(w[0].shape[0], w[1].shape[0]), torch.nn.ReLU(),
                                torch.nn.Linear(w[1].shape[0], 10)).double()
    with torch.no_grad():
        for layer, mat in zip([model[0], model[2], model[4]], w, strict=True):
            layer.weight.copy_(torch.from_numpy(mat))
    net = Network(model, (784,), 10, extract_layers(model, (784,)))
    return SpectralBackend().lipschitz(net, Norm.L2).value


def fmt(res):
    if "dnf" in res:
        return res["dnf"]
    return f"{res['value']:.6f} in {res['seconds']:.1f} s ({res['status']})"


def table(sizes, plain_timeout, tight_timeout):
    from lipverify.sdp import SDPOptions, Solver, lipsdp_bound

    rows = []
    for hidden in sizes:
        w = weights_for(hidden)
        relu = [(np.zeros(hidden), np.ones(hidden))] * 2
        start = time.perf_counter()
        ours = lipsdp_bound(w, relu)
        ours_s = time.perf_counter() - start
        print(f"784-{hidden}-{hidden}-10: lipverify LipSDP-Neuron (ipm) {ours.value:.6f} in "
              f"{ours_s:.1f} s (solver {ours.status}, LMI {ours.solved_size} reduced from "
              f"{ours.full_size})", flush=True)
        scs = None
        if hidden <= 128:
            start = time.perf_counter()
            scs_b = lipsdp_bound(w, relu, SDPOptions(solver=Solver.SCS, tolerance=1e-5))
            scs = (scs_b.value, time.perf_counter() - start)
            print(f"  lipverify LipSDP-Neuron (scs, 1e-5) {scs[0]:.6f} in {scs[1]:.1f} s",
                  flush=True)
        product = product_bound(w)
        print(f"  product bound {product:.6f}", flush=True)
        # The two references run concurrently, after our own timing, each capped.
        refs = run_children(["tight", "plain"], hidden,
                            {"tight": tight_timeout, "plain": plain_timeout})
        tight, plain = refs["tight"], refs["plain"]
        print(f"  tight SCS ({TIGHT_TOLERANCE:g}, reduced): {fmt(tight)}", flush=True)
        print(f"  plain cvxpy formulation: {fmt(plain)}", flush=True)
        rows.append((hidden, ours.value, ours_s, scs, plain, tight, product))
    print()
    print("| network | lipverify ipm: value, time | lipverify scs 1e-5 | plain cvxpy (SCS) "
          "| tight SCS reduced | ours / tight - 1 | product | ours / product |")
    print("|---|---|---|---|---|---|---|---|")
    for hidden, val, secs, scs, plain, tight, product in rows:
        rel = f"{val / tight['value'] - 1:+.2e}" if "value" in tight else "n/a"
        scs_txt = f"{scs[0]:.6f}, {scs[1]:.1f} s" if scs else "not run"
        print(f"| 784-{hidden}-{hidden}-10 | {val:.6f}, {secs:.1f} s | {scs_txt} | {fmt(plain)} "
              f"| {fmt(tight)} | {rel} | {product:.6f} | {val / product:.4f} |")


def shipped_agreement():
    """lipverify against the plain formulation on the shipped MLP (global bound)."""
    import torch

    from lipverify.models import load_shipped
    from lipverify.sdp import lipsdp_bound

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "sdp"))
    from lipsdp_reference import plain_lipsdp

    model = load_shipped("digits_mlp")
    w = [m.weight.detach().double().numpy() for m in model if isinstance(m, torch.nn.Linear)]
    relu = [(np.zeros(m.shape[0]), np.ones(m.shape[0])) for m in w[:-1]]
    start = time.perf_counter()
    ours = lipsdp_bound(w, relu)
    ours_s = time.perf_counter() - start
    scales = [2.0 ** np.ceil(np.log2(np.linalg.norm(m, 2))) for m in w]
    start = time.perf_counter()
    plain = plain_lipsdp([m / s for m, s in zip(w, scales, strict=True)], np.zeros(96),
                         np.ones(96), eps=1e-6) * float(np.prod(scales))
    print(f"\nshipped digits_mlp global: lipverify {ours.value:.6f} ({ours_s:.1f} s), plain "
          f"cvxpy/SCS 1e-6 {plain:.6f} ({time.perf_counter() - start:.1f} s), relative "
          f"difference {ours.value / plain - 1:+.2e}", flush=True)


def cascade_table(eps_list, limit):
    import torch  # noqa: F401

    from lipverify.backends.lipsdp import LipSDPBackend, LipSDPOptions
    from lipverify.backends.spectral import SpectralBackend
    from lipverify.data import digits_split
    from lipverify.models import INPUT_SHAPE, load_shipped
    from lipverify.network.extract import extract_layers
    from lipverify.network.network import Network
    from lipverify.orchestrator import counts, run_cascade
    from lipverify.types import Perturbation, Problem

    model = load_shipped("digits_mlp")
    net = Network(model, INPUT_SHAPE, 10, extract_layers(model, INPUT_SHAPE), name="digits_mlp")
    _, _, x, y = digits_split()
    x, y = x[:limit], y[:limit]
    spectral = SpectralBackend()
    with tempfile.TemporaryDirectory() as cache:
        lipsdp = LipSDPBackend(LipSDPOptions(cache_dir=cache))
        start = time.perf_counter()
        lipsdp.pair_bounds(net)
        print(f"\nshipped digits_mlp: 45 pairwise LipSDP bounds in "
              f"{time.perf_counter() - start:.1f} s; {len(x)} test inputs, L2")
        print("| eps | spectral alone | spectral + lipsdp | lipsdp won |")
        print("|---|---|---|---|")
        for eps in eps_list:
            problem = Problem.robustness(x, y, 10, Perturbation.ball(2, eps))
            alone = counts(run_cascade(net, problem, [spectral]))["best"]
            both = run_cascade(net, problem, [spectral, lipsdp])
            won = sum(c.backend == "lipsdp" and c.status.value == "verified" for c in both.best)
            print(f"| {eps} | {alone} | {counts(both)['best']} | {won} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--plain-timeout", type=float, default=600)
    parser.add_argument("--tight-timeout", type=float, default=600)
    parser.add_argument("--eps", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--inputs", type=int, default=450)
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--child", choices=["plain", "tight"])
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child == "plain":
        return plain_child(args.hidden, args.out)
    if args.child == "tight":
        return tight_child(args.hidden, args.out)
    if not args.skip_table:
        table([int(s) for s in args.sizes.split(",")], args.plain_timeout, args.tight_timeout)
        shipped_agreement()
    cascade_table([float(e) for e in args.eps.split(",")], args.inputs)


if __name__ == "__main__":
    main()
