"""lipverify's CROWN against raw auto_LiRPA, and certified counts of the bound backends.

Prints, measured in this run on the shipped digits models (held-out digits inputs):

1. Overhead: wall time of `LirpaBackend().certify` (budget mode, a fresh backend each time, so
   including building the bounded module, its trial bounds, the centre forward pass and the
   certificates) against raw auto_LiRPA called directly (build `BoundedModule`, specification
   matrix, CROWN bounds, count), with its default options and with lipverify's (every
   intermediate neuron by CROWN). Interleaved repeats, best of each (the machine may be shared).
2. Certified counts at several eps, L-infinity and L2: spectral, CROWN (`lirpa`), alpha-CROWN,
   local Lipschitz (`local`) and the cascade's `best`, from one `run_cascade(Mode.RADIUS)` per
   model and norm (an input counts at eps when its certified radius reaches eps), with each
   backend's total time.
3. The conformance kit on `lirpa`, `local` and `alpha-crown` (all checks, attack included).

    .venv/bin/python benchmarks/bench_lirpa.py [--inputs 100] [--repeats 5] [--alpha-iterations 10]
"""

import argparse
import logging
import time

import numpy as np
import torch

from lipverify.backends._lirpa_compat import load_auto_lirpa
from lipverify.backends.lirpa import AlphaCrownBackend, LirpaBackend, LirpaOptions
from lipverify.backends.local_lipschitz import LocalLipschitzBackend
from lipverify.backends.registry import BackendRegistry
from lipverify.data import load_data
from lipverify.errors import LipverifyError
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.load import build_network
from lipverify.orchestrator import Mode, run_cascade
from lipverify.testing import check_backend
from lipverify.types import Norm, Perturbation, Problem, Status

MODELS = ("digits_mlp", "digits_cnn")
BUDGET_EPS = {Norm.LINF: 0.02, Norm.L2: 0.3}
EPS_GRID = {Norm.LINF: (0.01, 0.02, 0.03, 0.05), Norm.L2: (0.1, 0.2, 0.3, 0.5)}
BACKENDS = ("spectral", "lirpa", "alpha-crown", "local")


# lipverify bounds every intermediate neuron by CROWN (batch-independent bounds); auto_LiRPA's
# default picks the neurons from the whole batch. Both are timed.
SAME_OPTIONS = {"sparse_intermediate_bounds": False, "sparse_conv_intermediate_bounds": False}


def raw_crown(module, x, labels, norm, eps, bound_opts=None, bounded=None):
    """Raw auto_LiRPA: bounded module, C matrix, CROWN, count (what lipverify's budget mode does).

    `module` is loaded once outside the timing, as lipverify's network is; with `bounded` given
    (warm), the bounded module is reused.
    """
    lirpa = load_auto_lirpa()
    if bounded is None:
        bounded = lirpa.BoundedModule(module, torch.zeros((1, *INPUT_SHAPE)),
                                      bound_opts=bound_opts)
    lab = torch.as_tensor(labels)
    others = torch.stack([torch.cat([torch.arange(t), torch.arange(t + 1, 10)]) for t in lab])
    c = torch.zeros((len(x), 9, 10))
    c.scatter_(2, lab.view(-1, 1, 1).expand(-1, 9, 1), 1.0)
    c.scatter_(2, others.unsqueeze(2), -1.0)
    ptb = lirpa.PerturbationLpNorm(norm=np.inf if norm == Norm.LINF else 2, eps=eps)
    with torch.no_grad():
        lower, _ = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=c,
                                          method="CROWN", bound_upper=False)
    return int((lower > 0).all(dim=1).sum())


def ours_crown(network, problem, backend=None):
    certs = (backend or LirpaBackend()).certify(network, problem)
    return sum(c.status == Status.VERIFIED for c in certs)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def overhead(inputs, repeats):
    print("## CROWN: lipverify vs raw auto_LiRPA (budget mode, best of "
          f"{repeats} interleaved runs, seconds)\n")
    print("Cold: everything built in the timed call (raw: `BoundedModule`; lipverify: a fresh "
          "backend, so its adapter with the forward check and trial bounds). Warm: the bounded "
          "module / backend already built (lipverify caches its adapter per network). 'same' = "
          "raw auto_LiRPA with lipverify's options (every intermediate neuron by CROWN).\n")
    print("| model | norm | eps | inputs | raw default cold | raw same cold | lipverify cold | "
          "raw same warm | lipverify warm | overhead cold | overhead warm | verified (raw / "
          "ours) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    x, y = load_data("digits", limit=inputs)
    # One memory layout for both (a size-1 channel with odd strides picks other conv kernels).
    xt = torch.as_tensor(x).clone(memory_format=torch.contiguous_format)
    x = xt.numpy()
    lirpa = load_auto_lirpa()
    for name in MODELS:
        module = load_shipped(name)
        network = build_network(load_shipped(name), INPUT_SHAPE)
        bounded = lirpa.BoundedModule(module, torch.zeros((1, *INPUT_SHAPE)),
                                      bound_opts=SAME_OPTIONS)
        for norm in (Norm.LINF, Norm.L2):
            eps = BUDGET_EPS[norm]
            problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, eps))
            warm = LirpaBackend()
            ours_crown(network, problem, warm)
            runs = {"default": lambda: raw_crown(module, xt, y, norm, eps),
                    "same": lambda: raw_crown(module, xt, y, norm, eps, SAME_OPTIONS),
                    "ours": lambda: ours_crown(network, problem),
                    "same_warm": lambda: raw_crown(module, xt, y, norm, eps, bounded=bounded),
                    "ours_warm": lambda: ours_crown(network, problem, warm)}
            times = {k: [] for k in runs}
            found = {}
            for _ in range(repeats):
                for key, fn in runs.items():
                    seconds, found[key] = _timed(fn)
                    times[key].append(seconds)
            t = {k: min(v) for k, v in times.items()}
            print(f"| {name} | {norm.value} | {eps} | {len(x)} | {t['default']:.4f} | "
                  f"{t['same']:.4f} | {t['ours']:.4f} | {t['same_warm']:.4f} | "
                  f"{t['ours_warm']:.4f} | {100 * (t['ours'] / t['same'] - 1):+.1f} % | "
                  f"{100 * (t['ours_warm'] / t['same_warm'] - 1):+.1f} % | "
                  f"{found['default']} / {found['ours']} |", flush=True)
    print()


def _backends(alpha_iterations):
    made = {"lirpa": LirpaBackend(), "local": LocalLipschitzBackend(),
            "alpha-crown": AlphaCrownBackend(LirpaOptions(alpha_iterations=alpha_iterations))}
    try:
        made["spectral"] = BackendRegistry.from_entry_points().create("spectral")
    except LipverifyError as exc:
        logging.warning("spectral unavailable: %s", exc)
    return made


def counts_table(inputs, alpha_iterations):
    print(f"## Certified inputs (of {inputs}) per eps; run_cascade(Mode.RADIUS); alpha-CROWN "
          f"with {alpha_iterations} iterations\n")
    x, y = load_data("digits", limit=inputs)
    header = "| model | norm | eps | " + " | ".join(BACKENDS) + " | best |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    timings = []
    for name in MODELS:
        network = build_network(load_shipped(name), INPUT_SHAPE)
        for norm in (Norm.LINF, Norm.L2):
            grid = EPS_GRID[norm]
            problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, BUDGET_EPS[norm]),
                                         want_radius=True)
            made = _backends(alpha_iterations)
            outcome = run_cascade(network, problem, list(made.values()), Mode.RADIUS)
            radii = {}
            for backend in BACKENDS:
                certs = outcome.per_backend.get(backend)
                if certs is None or backend in outcome.skipped:
                    continue
                radii[backend] = np.array([c.radius if c is not None and
                                           c.status != Status.FALSIFIED else 0.0 for c in certs])
                seconds = sum(c.seconds for c in certs if c is not None)
                timings.append((name, norm.value, backend, seconds))
            best = np.array([c.radius if c.status != Status.FALSIFIED else 0.0
                             for c in outcome.best])
            for eps in grid:
                cells = [str(int(np.sum(radii[b] >= eps))) if b in radii else "n/a"
                         for b in BACKENDS]
                print(f"| {name} | {norm.value} | {eps} | " + " | ".join(cells) +
                      f" | {int(np.sum(best >= eps))} |", flush=True)
            means = ", ".join(f"{b} {radii[b].mean():.4f}" for b in BACKENDS if b in radii)
            print(f"| {name} | {norm.value} | mean radius | {means} | best {best.mean():.4f} |",
                  flush=True)
    print("\n## Time per backend (radius mode, all inputs)\n")
    print("| model | norm | backend | seconds |")
    print("|---|---|---|---|")
    for name, norm, backend, seconds in timings:
        print(f"| {name} | {norm} | {backend} | {seconds:.1f} |")


def conformance(alpha_iterations):
    print("\n## Conformance kit (lipverify.testing.check_backend), all checks\n")
    for backend in (LirpaBackend(), LocalLipschitzBackend(),
                    AlphaCrownBackend(LirpaOptions(alpha_iterations=alpha_iterations))):
        start = time.perf_counter()
        report = check_backend(backend)
        print(f"{report}\n({time.perf_counter() - start:.0f} s)\n", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100, help="Inputs per model.")
    parser.add_argument("--overhead-inputs", type=int, default=450,
                        help="Inputs for the overhead table (450: the whole test split).")
    parser.add_argument("--repeats", type=int, default=5, help="Timing repeats.")
    parser.add_argument("--alpha-iterations", type=int, default=10,
                        help="alpha-CROWN optimisation steps.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    parser.add_argument("--no-conformance", action="store_true",
                        help="Skip the conformance kit section.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device cpu\n")
    overhead(args.overhead_inputs, args.repeats)
    counts_table(args.inputs, args.alpha_iterations)
    if not args.no_conformance:
        conformance(args.alpha_iterations)


if __name__ == "__main__":
    main()
