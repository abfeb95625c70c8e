"""Provable upper bounds on norms of explicit (batches of) matrices, floating-point error included.

Three sound bounds of the spectral norm, of which callers take the minimum:

- `svd_bound`: the largest singular value from LAPACK in float64, inflated by a worst-case
  backward-error slack (Householder bidiagonalisation is backward stable, Higham 2002,
  Thm 19.4; the singular values of the bidiagonal are then relatively accurate, Demmel & Kahan
  1990; Weyl's inequality turns the backward error into a bound on the top singular value).
- `gram_bound`: Gram iteration (Delattre, Barthélemy, Araujo, Allauzen, "Efficient bound of
  Lipschitz constant for convolutional layers by Gram iteration", ICML 2023):
  `||G||_2 <= ||G_t||_F^(1/2^t)` with `G_{k+1} = G_k^H G_k`, rescaled by exact powers of two,
  and every rounding error of the computed iterates carried through (Higham 2002, §3.5-3.6),
  so the result needs no trust in LAPACK at all.
- `frobenius_upper`: `||G||_2 <= ||G||_F`.

It also holds the rounding helpers every norm module shares: a float64 operation is correctly
rounded (IEEE 754), so the exact result of one `+ * / sqrt` lies within one ulp of the computed
one and `up` (the next float towards +inf) bounds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

EPS64 = float(np.finfo(np.float64).eps) / 2  # unit roundoff u of float64
# Bound on the absolute error one product or sum makes through underflow (gradual underflow:
# at most half the smallest subnormal), used with a generous count of operations.
UNDERFLOW_ABS = 2.0 ** -1070
# Safety factor on Higham's `sqrt(2) * gamma_{n+2}` bound of a complex inner product (Higham
# 2002, Lemma 3.5 and §3.6): covers any summation order, FMA and normwise-stable BLAS kernels.
MATMUL_ERROR_FACTOR = 4.0
# Worst-case relative slack of a LAPACK largest singular value: c * m * n * sqrt(min(m, n)) * u
# (columnwise backward error gamma~_{mn} of the Householder steps, Higham Thm 19.4, turned into
# a 2-norm bound through ||A||_F <= sqrt(rank) ||A||_2). Negligible in practice (1e-8 at 1000^2).
SVD_ERROR_CONSTANT = 8.0
# Gram iteration: stop refining a matrix once one more step improves its bound by less than this
# relative amount (the remaining excess is then about twice as large), or after GRAM_MAX_STEPS.
GRAM_REL_TOL = 2e-5
GRAM_MAX_STEPS = 18
# Gram cross-check of a dense layer only up to this inner dimension (cost d^3 per step).
GRAM_DENSE_MAX_DIM = 512
# Matrices whose squared Frobenius norm is below this stop at their Frobenius bound (rescaling
# them by a power of two could overflow).
TINY_FRO2 = 1e-280


def up(x: np.ndarray | float) -> np.ndarray | float:
    """The next float64 towards +inf: bounds the exact value of one correctly rounded operation."""
    return np.nextafter(x, np.inf)


def down(x: np.ndarray | float) -> np.ndarray | float:
    """The next float64 towards -inf."""
    return np.nextafter(x, -np.inf)


def gamma(n: int) -> float:
    """Higham's `gamma_n = n u / (1 - n u)`, rounded up (error factor of `n` operations)."""
    nu = n * EPS64
    if nu >= 0.5:
        return math.inf
    return float(up(up(nu) / down(1.0 - nu)))


def mul_up(a: float, b: float) -> float:
    """An upper bound of the exact product of two non-negative floats."""
    return float(up(a * b))


def _count(x: np.ndarray, axes: tuple[int, ...] | int | None) -> int:
    if axes is None:
        return x.size
    return math.prod(x.shape[a] for a in ((axes,) if isinstance(axes, int) else axes))


def sumsq_upper(x: np.ndarray, axes: tuple[int, ...] | int | None = None) -> np.ndarray:
    """Upper bounds of `sum |x|^2` over `axes` (real or complex), rounding and underflow included.

    Each slice is first scaled by an exact power of two bringing its largest modulus into
    [1/2, 1) (so nothing overflows and only negligible entries can underflow). Each `|x|^2` costs
    at most three roundings and the sum of `n` terms `n - 1` more, so the exact scaled sum is at
    most `computed * (1 + gamma_{n+2}) + n * UNDERFLOW_ABS`; scaling back is exact (then rounded
    up in case the result is subnormal).
    """
    x = np.asarray(x)
    mag = np.abs(x)
    peak = np.max(mag, axis=axes, keepdims=True) if x.size else np.zeros((1,) * x.ndim)
    e = np.frexp(peak)[1]
    scaled = np.ldexp(mag, -e)
    total = np.sum(scaled ** 2, axis=axes)
    count = _count(x, axes)
    factor = up(1.0 + gamma(count + 2))
    nonzero = np.squeeze(peak, axis=axes) > 0 if axes is not None else peak.ravel()[0] > 0
    bound = up(up(total * factor) + count * UNDERFLOW_ABS)
    e2 = 2 * (np.squeeze(e, axis=axes) if axes is not None else e.ravel()[0])
    return np.where(nonzero, up(np.ldexp(bound, e2)), 0.0)


def norm2_upper(x: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Upper bounds of the Euclidean (Frobenius) norm over `axis`."""
    return up(np.sqrt(sumsq_upper(x, axis)))


def abs_sum_upper(x: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Upper bounds of `sum |x|` over `axis` (`n - 1` roundings of non-negative terms).

    Sums of floats never underflow, so no absolute term is needed.
    """
    x = np.asarray(x)
    total = np.sum(np.abs(x), axis=axis)
    return up(total * up(1.0 + gamma(_count(x, axis) + 1)))


def frobenius_upper(matrix: np.ndarray) -> float:
    """`||M||_F`, rounded up: always an upper bound of `||M||_2`."""
    return float(norm2_upper(matrix))


def svd_relative_slack(m: int, n: int) -> float:
    """Relative slack covering LAPACK's error in the largest singular value of an m x n matrix."""
    return SVD_ERROR_CONSTANT * m * n * math.sqrt(max(min(m, n), 1)) * EPS64


def svd_bound(matrix: np.ndarray) -> float | np.ndarray:
    """Largest singular value in float64, inflated by `svd_relative_slack` (sound upper bound).

    With backward error `||E||_2 <= slack * ||M||_2`, Weyl gives
    `||M||_2 <= sigma_hat + slack ||M||_2`, i.e. `||M||_2 <= sigma_hat / (1 - slack)`. Complex
    matrices get twice the slack (a complex flop is a few real ones). A batch `(B, m, n)` gives
    an array of `B` bounds, one matrix a float.
    """
    a = np.asarray(matrix)
    a = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64, copy=False)
    if a.ndim == 3:
        if a.size == 0:
            return np.zeros(a.shape[0])
        m, n = a.shape[1:]
        slack = svd_relative_slack(m, n) * (2.0 if np.iscomplexobj(a) else 1.0)
        if slack >= 0.5:
            return norm2_upper(a, (1, 2))
        sigma = np.linalg.svd(a, compute_uv=False)[:, 0]
        return up(up(sigma) / down(1.0 - slack))
    if a.size == 0:
        return 0.0
    return float(svd_bound(a[None])[0])


@dataclass(frozen=True)
class GramResult:
    """Per-matrix upper bounds from Gram iteration, and how many Gram steps each took."""

    bounds: np.ndarray
    steps: np.ndarray


def _bounds_from_history(final_fro: np.ndarray, exps: list[np.ndarray], fro2: list[np.ndarray],
                         mus: list[float], abs_err: list[float]) -> np.ndarray:
    """Run the error-carrying recursion `b_k = 2^e_k sqrt(b_{k+1} + mu_k ||P_k||_F^2 + a_k)`.

    `P_k = 2^-e_k G_k` (exact scaling), `G_{k+1} = fl(P_k^H P_k)` with error at most
    `mu_k ||P_k||_F^2 + a_k` in Frobenius norm, and `final_fro >= ||G_t||_F`. Then
    `||G_k||_2^2 = 4^e_k ||P_k^H P_k||_2 <= 4^e_k (||G_{k+1}||_2 + error)`.
    """
    b = np.asarray(final_fro, dtype=np.float64)
    for k in range(len(exps) - 1, -1, -1):
        inner = up(up(b + up(mus[k] * fro2[k])) + abs_err[k])
        b = np.ldexp(up(np.sqrt(inner)), exps[k])
    return b


def gram_bound(mats: np.ndarray | torch.Tensor, prune_below: float | None = 0.0,
               max_steps: int = GRAM_MAX_STEPS, rel_tol: float = GRAM_REL_TOL) -> GramResult:
    """Sound upper bounds of the spectral norm of each matrix in a batch, by Gram iteration.

    A matrix stops iterating when its bound improves by less than `rel_tol`, or once its bound
    falls below `prune_below` or below the largest lower estimate seen in the batch (its bound is
    then kept as is: still sound, and it cannot raise the batch maximum callers take).

    Args:
        mats: real or complex float64 matrices, batch first.
        prune_below: a lower estimate of the batch maximum (0 if none); None turns pruning off
            (every matrix iterates to convergence: tight bounds for each, not only the max).
        max_steps: at most this many Gram steps per matrix.
        rel_tol: relative improvement below which a matrix is considered converged.

    Returns:
        Upper bounds of `||mats[b]||_2` (the computed matrices themselves; errors made before,
        e.g. in a Fourier transform, are the caller's to add) and the step counts.

    """
    g = torch.as_tensor(mats)
    g = g.to(torch.complex128) if g.is_complex() else g.to(torch.float64)
    batch = g.shape[0]
    if g.shape[1] < g.shape[2]:  # G G^H is the smaller Gram matrix with the same top eigenvalue
        g = g.transpose(1, 2).conj().resolve_conj().contiguous()
    # Scale each matrix by an exact power of two (largest modulus in [1/2, 1)); scaled back at
    # the end, so tiny and huge matrices neither underflow nor overflow.
    peak = g.abs().amax(dim=(1, 2)).numpy() if g.numel() else np.zeros(batch)
    scale_e = np.frexp(peak)[1].astype(np.int64)
    g = g * torch.from_numpy(np.ldexp(1.0, -scale_e)).view(-1, 1, 1).to(g.dtype)
    bounds = np.full(batch, np.inf)
    steps = np.zeros(batch, dtype=np.int64)
    if batch == 0:
        return GramResult(bounds, steps)
    active = np.arange(batch)
    exps: list[np.ndarray] = []
    fro2: list[np.ndarray] = []
    mus: list[float] = []
    abs_err: list[float] = []
    prev = np.full(batch, np.inf)
    prune = prune_below is not None
    floor = float(prune_below) if prune else -math.inf
    for step in range(max_steps + 1):
        fro2_now = sumsq_upper(g.numpy(), (1, 2))
        current = _bounds_from_history(up(np.sqrt(fro2_now)), [e[active] for e in exps],
                                       [f[active] for f in fro2], mus, abs_err)
        current = np.where(peak[active] > 0, up(np.ldexp(current, scale_e[active])), 0.0)
        bounds[active] = np.minimum(bounds[active], current)
        steps[active] = step
        d = g.shape[2]
        # ||G_t||_2 >= ||G_t||_F / sqrt(d): a lower estimate of each matrix's norm.
        lower = current / float(d) ** (0.5 ** (step + 1))
        if prune:
            floor = max(floor, float(np.max(lower)))
        done = ((current <= floor) | (current >= prev[active] * (1 - rel_tol))
                | (fro2_now < TINY_FRO2))
        if step == max_steps or bool(np.all(done)):
            break
        keep = ~done
        prev[active] = current
        active = active[keep]
        g = g[torch.from_numpy(keep)]
        fro2_now = fro2_now[keep]
        # Rescale by an exact power of two so that ||P||_F lies in [1/2, 1): no overflow.
        e = np.frexp(np.sqrt(fro2_now))[1].astype(np.int64)
        e = np.where(fro2_now > 0, e, 0)
        p = g * torch.from_numpy(np.ldexp(1.0, -e)).view(-1, 1, 1)
        inner = g.shape[1]
        full_e = np.zeros(batch, dtype=np.int64)
        full_f = np.zeros(batch)
        full_e[active] = e
        full_f[active] = sumsq_upper(p.numpy(), (1, 2))
        exps.append(full_e)
        fro2.append(full_f)
        mus.append(MATMUL_ERROR_FACTOR * math.sqrt(2) * gamma(inner + 2))
        abs_err.append(float(d) ** 3 * UNDERFLOW_ABS)
        g = torch.matmul(p.transpose(1, 2).conj(), p)
    return GramResult(bounds, steps)


def dense_inf_norm_bound(matrix: np.ndarray) -> float:
    """Induced inf->inf norm (largest row L1 norm), rounded up."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(abs_sum_upper(a, 1)))


def dense_inf_to_two_bound(matrix: np.ndarray) -> float:
    """A bound of the induced inf->2 norm: `sqrt(sum_i ||row_i||_1^2)` (each row separately)."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.size == 0:
        return 0.0
    return float(norm2_upper(abs_sum_upper(a, 1)))


@dataclass(frozen=True)
class MatrixNormBound:
    """A sound spectral-norm bound of a matrix: the smallest of several, and which won."""

    value: float
    method: str
    candidates: dict[str, float]


def matrix_norm_bound(matrix: np.ndarray,
                      gram_max_dim: int = GRAM_DENSE_MAX_DIM) -> MatrixNormBound:
    """The smallest of the SVD, Gram-iteration and Frobenius bounds of `||matrix||_2`."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.size == 0:
        return MatrixNormBound(0.0, "empty", {})
    cands = {"svd": svd_bound(a), "frobenius": frobenius_upper(a)}
    if min(a.shape) <= gram_max_dim:
        cands["gram"] = float(gram_bound(a[None]).bounds[0])
    method = min(cands, key=cands.get)
    return MatrixNormBound(cands[method], method, cands)
