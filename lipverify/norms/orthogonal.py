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


def _offset_deviation(kernels: np.ndarray, d1: int, d2: int) -> tuple[np.ndarray, np.ndarray]:
    """For one offset, per kernel of a batch `(G, co, ci, k1, k2)`: a bound of
    `||M[d] - [d = 0] I||_2` `(G,)`, and an entrywise bound of its moduli `(G, ci, ci)`."""
    _, _, ci, k1, k2 = kernels.shape
    (a1, b1), (a2, b2) = _overlap(k1, d1), _overlap(k2, d2)
    g = kernels.shape[0]
    # (G, ci, co * taps): M[d] = left @ right^T, a batched matrix product
    left = kernels[:, :, :, a1, a2].transpose(0, 2, 1, 3, 4).reshape(g, ci, -1)
    right = kernels[:, :, :, b1, b2].transpose(0, 2, 1, 3, 4).reshape(g, ci, -1)
    m = left @ right.transpose(0, 2, 1)
    terms = left.shape[2]
    # The computed sum of |products| may itself be low by gamma_n: MATMUL_ERROR_FACTOR covers it.
    err = MATMUL_ERROR_FACTOR * gamma(terms + 2) * (
        np.abs(left) @ np.abs(right).transpose(0, 2, 1)) + terms * UNDERFLOW_ABS
    if d1 == 0 and d2 == 0:
        m = m - np.eye(ci)  # one rounding per diagonal entry: covered by the 4u below
    err = up(err * (1 + 4 * EPS64) + 4 * EPS64 * np.abs(m))
    entries = up(np.abs(m) + err)
    frobenius = norm2_upper(entries, (1, 2))
    spectral = up(svd_bound(m) + norm2_upper(err, (1, 2)))
    return np.minimum(frobenius, spectral), entries


def kernel_gram_deviation(kernels: np.ndarray) -> np.ndarray:
    """Sound bounds of `||T^T T - I||_2` for the infinite-domain correlation with each kernel.

    Two bounds, the smaller kept: the sum over offsets `d` of bounds of
    `||M[d] - [d = 0] I||_2`, and `||sum_d |M[d] - [d = 0] I| ||_2` (at every frequency the
    deviation's symbol is entrywise dominated by that non-negative matrix, and a matrix
    dominated entrywise by a non-negative one has at most its spectral norm). `M[-d] = M[d]^T`,
    so only half of the offsets are computed.

    Args:
        kernels: `(G, c_out, c_in, k1, k2)` in float64 (a dense matrix is `(1, m, n, 1, 1)`).

    Returns:
        One bound per kernel, `(G,)`.

    """
    k = np.asarray(kernels, dtype=np.float64)
    g, _, ci, k1, k2 = k.shape
    parts = []
    dominant = np.zeros((g, ci, ci))
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
                dominant = up(up(dominant + entries) + entries.transpose(0, 2, 1))
    by_offset = abs_sum_upper(np.stack(parts), 0)
    summed = np.minimum(norm2_upper(dominant, (1, 2)), svd_bound(dominant))
    return np.minimum(by_offset, summed)


def _cogram_kernels(kernels: np.ndarray) -> np.ndarray:
    """The kernels of `T^T` up to a reflection of the grid: `T T^T` has their autocorrelation."""
    return np.ascontiguousarray(np.asarray(kernels).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1])


def _from_deviation(deviation: float, side: str) -> OrthogonalBound:
    return OrthogonalBound(float(up(math.sqrt(float(up(1.0 + deviation))))), deviation, side)


def grouped_orthogonal_bound(kernels: np.ndarray) -> OrthogonalBound:
    """`||T||_2 <= sqrt(1 + min(dev(T^T T), dev(T T^T)))`, the largest over groups.

    `kernels` is `(G, co_g, ci, k1, k2)`, the groups of a block-diagonal operator (as
    `lipverify.norms.conv.polyphase` returns them); its norm is the largest group's.
    """
    k = np.asarray(kernels, dtype=np.float64)
    gram = kernel_gram_deviation(k)
    cogram = kernel_gram_deviation(_cogram_kernels(k))
    per_group = np.minimum(gram, cogram)
    worst = int(np.argmax(per_group))
    side = "gram" if gram[worst] <= cogram[worst] else "cogram"
    return _from_deviation(float(per_group[worst]), side)


def dense_orthogonal_bound(matrix: np.ndarray) -> OrthogonalBound:
    """`||W||_2 <= sqrt(1 + ||G - I||_2)` with `G` the smaller of `W^T W` and `W W^T`."""
    w = np.asarray(matrix, dtype=np.float64)
    m, n = w.shape
    if m >= n:  # W^T W is n x n: it can be the identity
        return _from_deviation(float(kernel_gram_deviation(w[None, :, :, None, None])[0]), "gram")
    return _from_deviation(float(kernel_gram_deviation(w.T[None, :, :, None, None])[0]),
                           "cogram")
