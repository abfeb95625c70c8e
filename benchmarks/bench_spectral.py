"""Spectral backend benchmark: bound tightness and speed against exact values, and throughput.

Prints, in one run:

1. Dense layers: our sound bound (SVD + slack, Gram cross-check), Gram iteration alone and power
   iteration (a lower estimate) against the exact largest singular value (LAPACK, float64):
   value ratios and time ratios.
2. Convolutions (3x3 and 5x5, up to 64 channels, 16x16 and 32x32 inputs, zero padding): the
   twisted-circulant Gram bound, the plain-circulant Gram bound, the semi-explicit bound, the
   Fantastic Four bound, the combined layer bound and power iteration against a reference: the
   EXACT norm (dense symmetric eigensolver on the Gram matrix of the explicit operator) where the
   size allows, else ARPACK `svds` on the operator, marked `svds*`: itself only an estimate
   (bounds may then sit a hair below it only if ARPACK overshoots; they never did here).
3. Certify throughput of the spectral backend on the shipped MLP (and CNN): >= 10,000 inputs
   (the digits test split tiled), first call (bound included) and cached calls.

Run: `python benchmarks/bench_spectral.py [--quick] [--threads N]`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch
import torch.nn.functional as F  # noqa: N812
from threadpoolctl import threadpool_limits
from torch import nn

from lipverify.backends.spectral import SpectralBackend, SpectralOptions
from lipverify.data import load_data
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.layers import Conv, Dense
from lipverify.network.load import build_network
from lipverify.norms.conv import (
    conv_gram_bound,
    conv_matrix,
    conv_norm_bound,
    conv_semi_explicit_bound,
    fantastic_four_bound,
)
from lipverify.norms.dense import gram_bound, matrix_norm_bound
from lipverify.norms.power import layer_norm_estimate
from lipverify.types import Norm, Perturbation, Problem, Status

EXACT_MAX_SIDE = 4096  # dense eigensolver up to this many inputs (or outputs)
POWER_STEPS = 100
THROUGHPUT_TILES = 24  # 449 test digits x 24 = 10,776 inputs


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ------------------------------------------------------------------------------------- dense
def bench_dense(quick: bool) -> None:
    print("\n== Dense layers: bound / exact, estimate / exact (times relative to exact SVD) ==")
    print(f"{'shape':>12} {'exact':>10} {'bound/ex':>12} {'method':>6} {'gram/ex':>12} "
          f"{'power/ex':>10} {'t_exact':>8} {'t_bnd/t':>8} {'t_gram/t':>8} {'t_pow/t':>8}")
    rng = np.random.default_rng(0)
    mlp = [la for la in extract_layers(load_shipped("digits_mlp"), INPUT_SHAPE)
           if isinstance(la, Dense)]
    cases = [(f"mlp{i}", la.weight.numpy()) for i, la in enumerate(mlp)]
    shapes = [(64, 64), (256, 256), (512, 1024)] + ([] if quick else [(1024, 1024)])
    cases += [(f"{m}x{n}", rng.standard_normal((m, n)) / math.sqrt(n)) for m, n in shapes]
    for name, w in cases:
        exact, t_exact = timed(lambda w=w: float(np.linalg.svd(w, compute_uv=False)[0]))
        bound, t_bound = timed(lambda w=w: matrix_norm_bound(w))
        gram, t_gram = timed(lambda w=w: float(gram_bound(w[None]).bounds[0]))
        layer = Dense(torch.from_numpy(w), torch.zeros(w.shape[0], dtype=torch.float64),
                      (w.shape[1],), (w.shape[0],))
        power, t_power = timed(lambda la=layer: layer_norm_estimate(la, POWER_STEPS).value)
        print(f"{name:>12} {exact:10.4f} {bound.value / exact:12.10f} {bound.method:>6} "
              f"{gram / exact:12.10f} {power / exact:10.6f} {t_exact:8.4f} "
              f"{t_bound / t_exact:8.2f} {t_gram / t_exact:8.2f} {t_power / t_exact:8.2f}")


# -------------------------------------------------------------------------------- convolution
def _smooth(weight: torch.Tensor) -> torch.Tensor:
    """Random kernels low-passed by a binomial filter: a stand-in for trained kernels."""
    co, ci, k, _ = weight.shape
    blur = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float64) / 16
    flat = F.pad(weight.reshape(-1, 1, k, k), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(flat, blur.view(1, 1, 3, 3)).reshape(co, ci, k, k)


def _conv_layer(c: int, k: int, stride: int, size: int, smooth: bool, seed: int) -> Conv:
    torch.manual_seed(seed)
    module = nn.Conv2d(c, c, k, stride=stride, padding=k // 2, bias=False).double()
    if smooth:
        with torch.no_grad():
            module.weight.copy_(_smooth(module.weight))
    (layer,) = extract_layers(module, (c, size, size))
    return layer


def _reference(layer: Conv) -> tuple[str, float]:
    """Exact norm by a dense eigensolver when small enough, else an ARPACK estimate (svds*)."""
    n_in, n_out = math.prod(layer.in_shape), math.prod(layer.out_shape)
    if min(n_in, n_out) <= EXACT_MAX_SIDE:
        m = conv_matrix(layer)
        gram = (m.T @ m if n_in <= n_out else m @ m.T).toarray()
        top = scipy.linalg.eigh(gram, eigvals_only=True, subset_by_index=[len(gram) - 1] * 2)
        return "exact", math.sqrt(float(top[0]))
    op = scipy.sparse.linalg.LinearOperator(
        (n_out, n_in), dtype=np.float64,
        matvec=lambda v: layer.linear(torch.from_numpy(v).reshape(1, -1)).reshape(-1).numpy(),
        rmatvec=lambda v: layer.adjoint(torch.from_numpy(v).reshape(1, -1)).reshape(-1).numpy())
    s = scipy.sparse.linalg.svds(op, k=1, tol=1e-10, return_singular_vectors=False,
                                 random_state=0)
    return "svds*", float(s[0])


def _conv_cases(quick: bool) -> list[tuple[str, Conv]]:
    cnn = [la for la in extract_layers(load_shipped("digits_cnn"), INPUT_SHAPE)
           if isinstance(la, Conv)]
    cases = [("digits_cnn.conv1 8x8", cnn[0]), ("digits_cnn.conv2 s2", cnn[1])]
    grid = [(4, 16, 1), (16, 16, 1), (16, 16, 2), (4, 32, 1)]
    if not quick:
        grid += [(64, 16, 1), (64, 32, 1)]
    for c, size, stride in grid:
        for k in (3, 5):
            if c == 64 and size == 32 and k == 5:
                continue  # the ARPACK reference alone takes minutes here
            kind = "smooth"
            cases.append((f"{kind} c{c} {k}x{k} {size}x{size} s{stride}",
                          _conv_layer(c, k, stride, size, True, 100 * c + 10 * k + size)))
    if not quick:
        cases.append(("gauss c64 3x3 16x16 s1", _conv_layer(64, 3, 1, 16, False, 7)))
    return cases


def bench_conv(quick: bool) -> None:
    print("\n== Convolutions (zero padding k//2): bound / reference, times relative to the "
          "reference ==")
    print("  gram: twisted circulant + Gram iteration; circ: plain circulant (twist 0); semi: "
          "rows exact x twisted columns;\n  ff: Fantastic Four; layer: min of all sound bounds "
          "(incl. exact matrix when small); power: lower estimate")
    print(f"{'case':>30} {'ref':>6} {'value':>8} {'gram':>7} {'circ':>7} {'semi':>7} {'ff':>6} "
          f"{'layer':>7} {'method':>14} {'power':>7} {'t_ref':>7} {'t_gram/t':>8} "
          f"{'t_layer/t':>9} {'t_pow/t':>7}")
    worst: dict[str, float] = {}
    for name, layer in _conv_cases(quick):
        (kind, ref), t_ref = timed(lambda la=layer: _reference(la))
        gram, t_gram = timed(lambda la=layer: conv_gram_bound(la))
        circ = conv_gram_bound(layer, twist_candidates=1).value
        semi = conv_semi_explicit_bound(layer, gram.twist)
        ff = fantastic_four_bound(layer)
        full, t_layer = timed(lambda la=layer: conv_norm_bound(la))
        power, t_power = timed(lambda la=layer: layer_norm_estimate(la, POWER_STEPS).value)
        semi_text = f"{semi / ref:7.4f}" if math.isfinite(semi) else f"{'-':>7}"
        print(f"{name:>30} {kind:>6} {ref:8.4f} {gram.value / ref:7.4f} {circ / ref:7.4f} "
              f"{semi_text} {ff / ref:6.3f} {full.value / ref:7.4f} {full.method:>14} "
              f"{power / ref:7.4f} {t_ref:7.2f} {t_gram / t_ref:8.2f} {t_layer / t_ref:9.2f} "
              f"{t_power / t_ref:7.2f}")
        ks = name.split()[2] if name.startswith(("smooth", "gauss")) else "digits"
        worst[f"gram {ks}"] = max(worst.get(f"gram {ks}", 0.0), gram.value / ref)
        worst[f"layer {ks}"] = max(worst.get(f"layer {ks}", 0.0), full.value / ref)
    print("  worst ratios: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(worst.items())))


# -------------------------------------------------------------------------------- throughput
def bench_throughput() -> None:
    print("\n== Certify throughput (spectral backend, L2 eps 0.1, robustness) ==")
    x, y = load_data("digits")
    x_all = np.tile(x, (THROUGHPUT_TILES, 1, 1, 1))
    y_all = np.tile(y, THROUGHPUT_TILES)
    problem = Problem.robustness(x_all, y_all, 10, Perturbation.ball(Norm.L2, 0.1))
    for name in ("digits_mlp", "digits_cnn"):
        network = build_network(load_shipped(name), INPUT_SHAPE, name=name)
        backend = SpectralBackend(SpectralOptions())
        certs, t_first = timed(lambda n=network, b=backend: b.certify(n, problem))
        cached = []
        for _ in range(3):
            _, t = timed(lambda n=network, b=backend: b.certify(n, problem))
            cached.append(t)
        t_cached = float(np.median(cached))
        verified = sum(c.status == Status.VERIFIED for c in certs) / len(certs)
        rate = len(problem) / t_cached
        print(f"{name:>11}: {len(problem)} inputs; first call {t_first:.3f} s "
              f"({len(problem) / t_first:,.0f}/s, bound included); cached {t_cached:.3f} s "
              f"= {rate:,.0f} inputs/s ({'meets' if rate >= 10_000 else 'MISSES'} the 10,000/s "
              f"goal); verified {verified:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 64-channel and "
                        "1024x1024 cases")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"lipverify spectral benchmark: torch {torch.__version__}, {args.threads} thread(s), "
          f"float64 bounds")
    with threadpool_limits(limits=args.threads):
        bench_dense(args.quick)
        bench_conv(args.quick)
        bench_throughput()


if __name__ == "__main__":
    main()
