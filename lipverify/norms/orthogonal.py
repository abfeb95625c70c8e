"""Cheap, tight norm bounds of near-orthogonal layers through their Gram operator's deviation.

Lipschitz-by-construction networks (orthogonal dense layers, BCOP, Cayley or SOC convolutions,
invertible downsampling) are built from layers with `A^T A = I` (or `A A^T = I`) up to float
error and training tolerances. For any linear map, `||A||_2^2 = ||A^T A||_2 <= 1 + ||A^T A - I||_2`,
so a small sound bound `delta` of the deviation gives `||A||_2 <= sqrt(1 + delta)`, within
`delta / 2` of 1: tight exactly where the general bounds (Gram iteration's convergence tolerance,
the circulant embedding's gap) leave a little slack, and cheap (one product, no iteration).

For a convolution the Gram operator of the infinite-domain stride-1 correlation `T` with kernel
`K` (co, ci, k1, k2) is itself a correlation, with the autocorrelation kernel
`M[d][c, c'] = sum_{o, u} K[o, c, u] K[o, c', u + d]` over offsets `|d| < k`. Shifts are unitary
on the infinite grid, so `||T^T T - I||_2 <= sum_d ||M[d] - [d = 0] I||_2` (triangle
inequality). `lipverify.norms.conv.polyphase` rewrites any zero-padded, strided, dilated
convolution as a finite restriction of such a `T` (norm at least the layer's); `T T^T` (the
autocorrelation of the transposed, flipped kernel) gives a second bound, and the smaller is kept.

Every entry of a computed autocorrelation is a sum of `n` products, so its error is at most
`gamma_n` times the same sum over absolute values (Higham 2002, §3.5), inflated by
`MATMUL_ERROR_FACTOR`; the `- I` is one more correctly rounded operation. Each offset's
deviation norm is the smaller of its Frobenius bound and an SVD bound (`svd_bound`, with slack)
plus the Frobenius norm of the error bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipverify.norms.dense import (
    EPS64,
    MATMUL_ERROR_FACTOR,
    UNDERFLOW_ABS,
    abs_sum_upper,
    gamma,
    norm2_upper,
    svd_bound,
    up,
)

# A layer counts as (near-)orthogonal when its certified Gram deviation is at most this: its
# bound sqrt(1 + delta) is then within 5e-3 of 1. Only a label in the details: the bound is
# sound and offered to the minimum for every deviation.
NEAR_ORTHOGONAL_DEVIATION = 1e-2


@dataclass(frozen=True)
class OrthogonalBound:
    """`value = sqrt(1 + deviation)` rounded up: a sound bound of the operator's L2 norm.

    Attributes:
        value: The norm bound.
        deviation: A sound bound of `||A^T A - I||_2` (or of `||A A^T - I||_2`, whichever
            side gave the smaller one).
        side: "gram" (`A^T A`, input side) or "cogram" (`A A^T`, output side).

    """

    value: float
    deviation: float
    side: str

    @property
    def near_orthogonal(self) -> bool:
        """Whether the layer is orthogonal up to `NEAR_ORTHOGONAL_DEVIATION`."""
        return self.deviation <= NEAR_ORTHOGONAL_DEVIATION


def _overlap(k: int, d: int) -> tuple[slice, slice]:
    """Taps `u` with `0 <= u, u + d < k`, as slices for `u` and for `u + d`."""
    return slice(max(0, -d), k - max(0, d)), slice(max(0, d), k + min(0, d))


def _offset_deviation(kernel: np.ndarray, d1: int, d2: int) -> tuple[float, np.ndarray]:
    """For one offset: a bound of `||M[d] - [d = 0] I||_2`, and an entrywise bound of its moduli."""
    co, ci, k1, k2 = kernel.shape
    (a1, b1), (a2, b2) = _overlap(k1, d1), _overlap(k2, d2)
    left, right = kernel[:, :, a1, a2], kernel[:, :, b1, b2]
    axes = ([0, 2, 3], [0, 2, 3])
    m = np.tensordot(left, right, axes=axes)
    terms = co * left.shape[2] * left.shape[3]
    # The computed sum of |products| may itself be low by gamma_n: MATMUL_ERROR_FACTOR covers it.
    err = MATMUL_ERROR_FACTOR * gamma(terms + 2) * np.tensordot(
        np.abs(left), np.abs(right), axes=axes) + terms * UNDERFLOW_ABS
    if d1 == 0 and d2 == 0:
        m = m - np.eye(ci)  # one rounding per diagonal entry: covered by the 4u below
    err = up(err * (1 + 4 * EPS64) + 4 * EPS64 * np.abs(m))
    entries = up(np.abs(m) + err)
    frobenius = float(norm2_upper(entries))
    spectral = float(up(svd_bound(m) + float(norm2_upper(err))))
    return min(frobenius, spectral), entries


def kernel_gram_deviation(kernel: np.ndarray) -> float:
    """A sound bound of `||T^T T - I||_2` for the infinite-domain correlation with `kernel`.

    Two bounds, the smaller kept: the sum over offsets `d` of bounds of
    `||M[d] - [d = 0] I||_2`, and `||sum_d |M[d] - [d = 0] I| ||_2` (at every frequency the
    deviation's symbol is entrywise dominated by that non-negative matrix, and a matrix
    dominated entrywise by a non-negative one has at most its spectral norm). `M[-d] = M[d]^T`,
    so only half of the offsets are computed.

    Args:
        kernel: `(c_out, c_in, k1, k2)` in float64 (a dense matrix is `(m, n, 1, 1)`).

    Returns:
        The bound.

    """
    k = np.asarray(kernel, dtype=np.float64)
    _, ci, k1, k2 = k.shape
    parts = []
    dominant = np.zeros((ci, ci))
    for d1 in range(0, k1):
        for d2 in range(-(k2 - 1), k2):
            if d1 == 0 and d2 < 0:
                continue  # (0, -d2) is the transpose of (0, d2)
            value, entries = _offset_deviation(k, d1, d2)
            if d1 == 0 and d2 == 0:
                parts.append(value)
                dominant = up(dominant + entries)
            else:
                parts.append(2.0 * value)
                dominant = up(up(dominant + entries) + entries.T)
    by_offset = float(abs_sum_upper(np.asarray(parts)))
    summed = min(float(norm2_upper(dominant)), svd_bound(dominant))
    return min(by_offset, summed)


def _cogram_kernel(kernel: np.ndarray) -> np.ndarray:
    """The kernel of `T^T` up to a reflection of the grid: `T T^T` has its autocorrelation."""
    return np.ascontiguousarray(np.asarray(kernel).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def _from_deviation(deviation: float, side: str) -> OrthogonalBound:
    return OrthogonalBound(float(up(math.sqrt(float(up(1.0 + deviation))))), deviation, side)


def kernel_orthogonal_bound(kernel: np.ndarray) -> OrthogonalBound:
    """`||T||_2 <= sqrt(1 + min(dev(T^T T), dev(T T^T)))` for a `(co, ci, k1, k2)` kernel."""
    k = np.asarray(kernel, dtype=np.float64)
    gram = kernel_gram_deviation(k)
    cogram = kernel_gram_deviation(_cogram_kernel(k))
    return _from_deviation(gram, "gram") if gram <= cogram else _from_deviation(cogram, "cogram")


def dense_orthogonal_bound(matrix: np.ndarray) -> OrthogonalBound:
    """`||W||_2 <= sqrt(1 + ||G - I||_2)` with `G` the smaller of `W^T W` and `W W^T`."""
    w = np.asarray(matrix, dtype=np.float64)
    m, n = w.shape
    if m >= n:  # W^T W is n x n: it can be the identity
        return _from_deviation(kernel_gram_deviation(w[:, :, None, None]), "gram")
    return _from_deviation(kernel_gram_deviation(w.T[:, :, None, None]), "cogram")


def grouped_orthogonal_bound(kernels: np.ndarray) -> OrthogonalBound:
    """The largest bound over groups `(G, co_g, ci, k1, k2)` (a block-diagonal operator)."""
    per = [kernel_orthogonal_bound(k) for k in kernels]
    return max(per, key=lambda b: b.value)
