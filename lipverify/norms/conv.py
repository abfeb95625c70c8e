"""Provable upper bounds on the L2 operator norm of the convolution a `Conv` layer really applies.

The operator is zero padding, then a correlation with stride, dilation and groups, restricted to
the layer's outputs. Three sound bounds, of which `conv_norm_bound` keeps the smallest:

- `conv_gram_bound` (the scalable one). Dilation becomes zeros in the kernel; a stride-s
  correlation is a stride-1 correlation of the space-to-depth (polyphase) rearranged padded input
  with `c_in * s_h * s_w` channels (exact); that stride-1 "valid" correlation only reads, for its
  outputs, a window of `N = H_out + k' - 1` rearranged rows (and columns), so it is the
  restriction of a *twisted* circular correlation on an `N1 x N2` grid (no output the layer
  computes ever wraps; restriction and the padding embedding have norm <= 1). A circulant with
  twist `theta` (wrapped entries multiplied by `e^{i theta}`) is unitarily block-diagonalised at
  the frequencies `(2 pi p + theta) / N`, so its norm is the largest singular value of the kernel's
  symbol over exactly that set; every twist gives a bound, and a cheap scan picks a good one (the
  plain circulant, twist 0, leaves a 2-6 % gap for 5x5 kernels on 16x16 inputs; a twist that
  straddles the symbol's peak removes most of it). Each frequency's singular value is bounded by
  Gram iteration (Delattre, Barthélemy, Araujo, Allauzen, ICML 2023) with rounding carried
  through, and the symbol itself is evaluated directly (a k-term sum, not an FFT) so its error
  bound is elementary.
- `fantastic_four_bound`: Singla & Feizi, "Fantastic Four: Differentiable bounds on singular
  values of convolution layers", ICLR 2021: `sqrt(h w) * min` of the norms of four reshapes of
  the kernel. Their proof only uses that each tap's shift operator has norm <= 1, which holds for
  zero padding, any stride (a subsampled shift) and dilation (a longer shift): valid for the
  undilated kernel per group, and for the polyphase kernel.
- `conv_explicit_bound`: the exact matrix of the layer (built by index arithmetic, no rounding)
  and the dense bounds of `lipverify.norms.dense`, when it is small enough.

For orthogonal convolutions (BCOP, invertible downsampling, SOC exported as a plain kernel)
`lipverify.norms.orthogonal` adds `sqrt(1 + ||T^T T - I||)` of the polyphase kernel, which is
within float error of 1 where the others keep a little slack (candidate "orthogonal").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import torch

from lipverify.network.layers import Conv
from lipverify.norms.dense import (
    EPS64,
    MatrixNormBound,
    abs_sum_upper,
    dense_inf_norm_bound,
    gamma,
    gram_bound,
    matrix_norm_bound,
    norm2_upper,
    svd_bound,
    up,
)
from lipverify.norms.orthogonal import grouped_orthogonal_bound

# Symbol entries computed per chunk of frequencies (complex128 entries): bounds memory use.
SYMBOL_CHUNK_ENTRIES = 2 ** 22
# Twist scan: candidate twists per axis, reduced while the scan would touch more symbol entries
# than SCAN_BUDGET_ENTRIES; power-iteration steps per frequency (estimates only pick the twist).
TWIST_CANDIDATES = 4
SCAN_BUDGET_ENTRIES = 2 ** 24
SCAN_POWER_STEPS = 8
# Gram iteration is run on this many twists (best estimates, and the plain circulant).
TWIST_TRIALS = 3
# Explicit matrices up to this many entries (dense float64) get an exact SVD.
EXPLICIT_MAX_ENTRIES = 2 ** 21
# Semi-explicit route: per-frequency row operators up to this many entries, at most this many
# frequencies (in decreasing order of their circulant bound; the others keep it).
SEMI_EXPLICIT_MAX_ENTRIES = 2 ** 18
SEMI_EXPLICIT_MAX_FREQUENCIES = 24
# Generous bound (in units of u) on the error of one computed twiddle factor exp(i w u) per
# kernel tap of index < k: the argument w*u carries a few roundings of a number <= 4 pi k, and
# cos/sin/exp are accurate to a few ulps.
TWIDDLE_ERROR_PER_TAP = 64.0
TWIDDLE_ERROR_BASE = 16.0
# Safety factor on the symbol's rounding bound (any contraction order of the einsum).
SYMBOL_ERROR_FACTOR = 8.0
# Convolutions whose certified Gram deviation is at most this skip Gram iteration: their bound
# sqrt(1 + deviation) is within 5e-6 of 1, below Gram iteration's convergence slack (~1e-5).
ORTHOGONAL_SHORTCUT_DEVIATION = 1e-5


def _dilated_kernel(layer: Conv) -> np.ndarray:
    """The kernel with dilation written out as zeros: `(c_out, c_in/groups, D_h, D_w)`."""
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    dh, dw = layer.dilation
    co, ci, kh, kw = w.shape
    out = np.zeros((co, ci, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    out[:, :, ::dh, ::dw] = w
    return out


@dataclass(frozen=True)
class PolyphaseConv:
    """A stride-1 "valid" correlation per group whose norm bounds the layer's (see `polyphase`).

    `kernel` has shape `(groups, c_out/groups, c_in', k1, k2)`; `grid` is the smallest circular
    grid `(N1, N2) = (n1 + k1 - 1, n2 + k2 - 1)` on which none of its `n1 x n2` outputs wraps.
    """

    kernel: np.ndarray
    grid: tuple[int, int]


def _axis_plan(size_out: int, stride: int, dilation: int) -> tuple[int, int]:
    """Per axis: (outputs of the largest independent class, effective stride).

    Outputs `i` and `i'` read common input rows only if `i - i'` is a multiple of
    `m = d / gcd(s, d)`, so the residue classes mod `m` are independent blocks; each is a
    correlation with stride `s m` and dilation `d`, the largest with `ceil(n / m)` outputs (the
    smaller ones are compressions of it).
    """
    m = dilation // math.gcd(stride, dilation)
    return -(-size_out // m), stride * m


def polyphase(layer: Conv) -> PolyphaseConv:
    """Rewrite `layer` as a stride-1 correlation whose norm is at least the layer's.

    Zero padding is an isometric embedding; independent output classes (dilation) split the
    operator into blocks, the largest kept (`_axis_plan`); the block's stride-`L` correlation with
    the dilated kernel (zeros written out) equals a stride-1 correlation of the space-to-depth
    rearranged input (`c_in L_h L_w` channels, exact). Channels the kernel never reads are
    dropped (zero columns change no singular value).
    """
    wd = _dilated_kernel(layer)
    co, ci, d1, d2 = wd.shape
    _, ho, wo = layer.out_shape
    n1, s1 = _axis_plan(ho, layer.stride[0], layer.dilation[0])
    n2, s2 = _axis_plan(wo, layer.stride[1], layer.dilation[1])
    k1, k2 = -(-d1 // s1), -(-d2 // s2)
    padded = np.zeros((co, ci, k1 * s1, k2 * s2))
    padded[:, :, :d1, :d2] = wd
    # padded[o, c, s1*u + r1, s2*v + r2] -> kernel[o, (c, r1, r2), u, v]
    k = padded.reshape(co, ci, k1, s1, k2, s2).transpose(0, 1, 3, 5, 2, 4)
    k = k.reshape(layer.groups, co // layer.groups, ci * s1 * s2, k1, k2)
    used = np.any(k != 0, axis=(0, 1, 3, 4))
    if not np.any(used):
        used[0] = True
    return PolyphaseConv(np.ascontiguousarray(k[:, :, used]), (n1 + k1 - 1, n2 + k2 - 1))


def _frequencies(n: int, twist: float) -> np.ndarray:
    """`(2 pi p + 2 pi twist) / n` for `p = 0..n-1` (`twist` in units of one full turn)."""
    return 2 * np.pi * (np.arange(n) + twist) / n


def _symbol(kernel: np.ndarray, om1: np.ndarray, om2: np.ndarray) -> torch.Tensor:
    """`sum_{u,v} K[..., u, v] e^{i (w1 u + w2 v)}` for every pair `(w1, w2)`: `(G*P1*P2, co, ci)`.

    The symbol of the correlation `y[i] = sum_u K[u] z[i + u]`: on `z = e^{i w n}` it multiplies
    by `sum_u K[u] e^{i w u}`.
    """
    k1, k2 = kernel.shape[-2:]
    a = torch.from_numpy(np.exp(1j * np.outer(om1, np.arange(k1))))
    b = torch.from_numpy(np.exp(1j * np.outer(om2, np.arange(k2))))
    kt = torch.from_numpy(kernel).to(torch.complex128)
    sym = torch.einsum("pu,goiuv,qv->gpqoi", a, kt, b)
    g, p1, p2, co, ci = sym.shape
    return sym.reshape(g * p1 * p2, co, ci)


def _symbol_error(kernel: np.ndarray) -> np.ndarray:
    """Per group, a bound on `||computed symbol - exact symbol||_2` at any frequency.

    Each entry is a sum of `k1 k2` products `K[u,v] a[u] b[v]` of twiddles with error `<= eta`,
    so its error is at most `rho * sum_{u,v} |K[u,v]|` with
    `rho = SYMBOL_ERROR_FACTOR * (2 eta + gamma_{k1 k2 + 8})`; the 2-norm of the error matrix is
    at most its Frobenius norm.
    """
    k1, k2 = kernel.shape[-2:]
    eta = (TWIDDLE_ERROR_PER_TAP * max(k1, k2) + TWIDDLE_ERROR_BASE) * EPS64
    rho = SYMBOL_ERROR_FACTOR * (2 * eta + gamma(k1 * k2 + 8))
    taps = abs_sum_upper(kernel, (3, 4))  # (G, co, ci)
    return up(rho * norm2_upper(taps, (1, 2)))


def _chunks(n1: int, per_row: int) -> list[slice]:
    rows = max(1, SYMBOL_CHUNK_ENTRIES // max(per_row, 1))
    return [slice(i, min(i + rows, n1)) for i in range(0, n1, rows)]


def _power_estimates(mats: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    """Power-iteration estimates (lower, up to rounding) of each matrix's largest singular value."""
    gen = torch.Generator().manual_seed(seed)
    mats = mats.to(torch.complex64)  # estimates only pick a twist: single precision suffices
    v = torch.randn(mats.shape[0], mats.shape[2], 1, generator=gen).to(mats.dtype) + 1.0
    for _ in range(steps):
        v = mats.mH @ (mats @ v)
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)
    return torch.nan_to_num(torch.linalg.vector_norm(mats @ v, dim=(1, 2)).double(), nan=0.0)


def rank_twists(pc: PolyphaseConv, candidates: int = TWIST_CANDIDATES,
                seed: int = 0) -> list[tuple[tuple[float, float], float]]:
    """Twists (in turns per axis) sorted by the estimated maximum of their frequency grid.

    All `candidates^2` twisted grids together form one grid `candidates` times finer, scanned once
    with power-iteration estimates (lower estimates of each grid's maximum). Only the choice rests
    on estimates: every twist gives a sound bound.
    """
    n1, n2 = pc.grid
    g, co, ci = pc.kernel.shape[:3]
    m = max(1, candidates)
    while m > 1 and m * m * n1 * n2 * g * co * ci > SCAN_BUDGET_ENTRIES:
        m //= 2
    om1, om2 = _frequencies(m * n1, 0.0), _frequencies(m * n2, 0.0)
    est = np.zeros((m * n1, m * n2))
    for rows in _chunks(m * n1, g * m * n2 * co * ci):
        sym = _symbol(pc.kernel, om1[rows], om2)
        e = _power_estimates(sym, SCAN_POWER_STEPS, seed).numpy()
        est[rows] = e.reshape(g, -1, m * n2).max(axis=0)
    # Fine index j = m p + a is the frequency (2 pi p + 2 pi a / m) / N: twist a / m.
    per_twist = est.reshape(n1, m, n2, m).max(axis=(0, 2))
    order = np.argsort(per_twist, axis=None, kind="stable")
    return [((int(i) // m / m, int(i) % m / m), float(per_twist.flat[i])) for i in order]


@dataclass(frozen=True)
class ConvGramResult:
    """A Gram-iteration bound of a convolution and how it was obtained."""

    value: float
    grid: tuple[int, int]
    twist: tuple[float, float]
    frequencies: int
    max_steps: int


def grid_bounds(pc: PolyphaseConv, twist: tuple[float, float], floor: float | None = 0.0,
                give_up_above: float = math.inf) -> tuple[np.ndarray | None, int]:
    """Per-frequency bounds `(G, N1, N2)` on a twisted grid: Gram bound plus symbol error bound.

    `floor` (a lower estimate of the grid's maximum) lets frequencies below it stop early (their
    bounds stay sound but loose); None refines every frequency. Returns None instead of the array
    once some bound exceeds `give_up_above` (the grid cannot beat it), and the most Gram steps.
    """
    n1, n2 = pc.grid
    g, co, ci = pc.kernel.shape[:3]
    om1, om2 = _frequencies(n1, twist[0]), _frequencies(n2, twist[1])
    err = _symbol_error(pc.kernel)  # (G,)
    out = np.zeros((g, n1, n2))
    best, steps = 0.0, 0
    for rows in _chunks(n1, g * n2 * co * ci):
        sym = _symbol(pc.kernel, om1[rows], om2)
        prune = None if floor is None else max(floor, best)
        res = gram_bound(sym, prune_below=prune)
        total = up(res.bounds.reshape(g, -1, n2) + err[:, None, None])
        out[:, rows] = total
        best = max(best, float(np.max(total)))
        steps = max(steps, int(np.max(res.steps)))
        if best > give_up_above:
            return None, steps
    return out, steps


def conv_gram_bound(layer: Conv, twist_candidates: int = TWIST_CANDIDATES,
                    trials: int = TWIST_TRIALS) -> ConvGramResult:
    """Sound bound of `||layer||_2`: Gram iteration per frequency of a twisted circulant embedding.

    Args:
        layer: the convolution (its zero padding, stride, dilation and groups are all honoured).
        twist_candidates: twists per axis the scan may try (1: plain circulant only).
        trials: Gram iteration runs on this many twists (the best-ranked ones and twist 0); the
            smallest result is kept, each being sound.

    Returns:
        The bound (max over the grid's frequencies of the Gram bound plus the symbol's error
        bound), the grid, the twist used, the number of frequencies and the most Gram steps.

    """
    pc = polyphase(layer)
    n1, n2 = pc.grid
    ranked = rank_twists(pc, twist_candidates) if twist_candidates > 1 else []
    tries = [t for t, _ in ranked[:max(trials - 1, 1)]]
    if (0.0, 0.0) not in tries:
        tries.append((0.0, 0.0))
    # The smallest estimated grid maximum is a lower estimate of every grid's maximum: pruning
    # frequencies whose bound is below it (lowered against rounding) changes no grid's maximum.
    floor = min(e for _, e in ranked) * (1 - 1e-6) if ranked else 0.0
    best = (math.inf, (0.0, 0.0), 0)
    for twist in tries:
        per, steps = grid_bounds(pc, twist, floor, best[0])
        if per is not None and float(np.max(per)) < best[0]:
            best = (float(np.max(per)), twist, steps)
    return ConvGramResult(best[0], (n1, n2), best[1], n1 * n2 * pc.kernel.shape[0], best[2])


# ------------------------------------------------------------------ semi-explicit embedding
def transposed(layer: Conv) -> Conv:
    """The same convolution with height and width swapped: the same operator norm.

    (It is the original conjugated by the permutations transposing every channel image.)
    """
    c, h, w = layer.in_shape
    co, ho, wo = layer.out_shape
    left, right, top, bottom = layer.padding
    return Conv(layer.weight.transpose(2, 3), layer.bias, (c, w, h), (co, wo, ho),
                layer.stride[::-1], (top, bottom, left, right), layer.dilation[::-1],
                layer.groups)


def _column_polyphase(layer: Conv) -> tuple[np.ndarray, int]:
    """Kernel `(G, co_g, c'', k_h, k2)` rewritten along columns only (like `polyphase`), and N2."""
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    co, ci, kh, kw = w.shape
    dw = layer.dilation[1]
    d2 = dw * (kw - 1) + 1
    n2, s2 = _axis_plan(layer.out_shape[2], layer.stride[1], dw)
    k2 = -(-d2 // s2)
    padded = np.zeros((co, ci, kh, k2 * s2))
    padded[:, :, :, :d2:dw] = w
    k = padded.reshape(co, ci, kh, k2, s2).transpose(0, 1, 4, 2, 3)
    k = k.reshape(layer.groups, co // layer.groups, ci * s2, kh, k2)
    used = np.any(k != 0, axis=(0, 1, 3, 4))
    if not np.any(used):
        used[0] = True
    return np.ascontiguousarray(k[:, :, used]), n2 + k2 - 1


def _row_operator(layer: Conv, taps: np.ndarray) -> np.ndarray:
    """The exact row operator `(H_out co_g, H c'')` of one column frequency from `(k_h, co, c'')`.

    Output row `i` reads input row `s i + d a - top` through tap `a` (rows outside the input are
    the zero padding and are left out: the operator acts on the real input rows only).
    """
    kh, co, ci = taps.shape
    h = layer.in_shape[1]
    ho = layer.out_shape[1]
    s, d, top = layer.stride[0], layer.dilation[0], layer.padding[2]
    m = np.zeros((ho, co, h, ci), dtype=np.complex128)
    i, a = np.meshgrid(np.arange(ho), np.arange(kh), indexing="ij")
    r = s * i + d * a - top
    ok = (r >= 0) & (r < h)
    m[i[ok], :, r[ok], :] = taps[a[ok]]
    return m.reshape(ho * co, h * ci)


def _row_operator_entries(layer: Conv) -> int:
    """Entries of one row operator of `_row_exact`."""
    kernel, _ = _column_polyphase(layer)
    return layer.out_shape[1] * kernel.shape[1] * layer.in_shape[1] * kernel.shape[2]


def _row_exact(layer: Conv, theta2: float, column_bounds: np.ndarray,
               max_frequencies: int) -> float:
    """Bound with rows exact and columns a twisted circulant (twist `theta2`, in turns).

    For every column frequency the operator is a finite row operator, bounded by a dense SVD
    (with slack) plus the error of its computed entries. `column_bounds[g, q]` must bound that
    operator too (e.g. the max over row frequencies of a 2-D grid with the same column twist):
    frequencies are done in decreasing order of it, and those never done keep it.
    """
    kernel, n2 = _column_polyphase(layer)
    k2 = kernel.shape[4]
    om2 = _frequencies(n2, theta2)
    twiddle = np.exp(1j * np.outer(om2, np.arange(k2)))  # (N2, k2)
    eta = (TWIDDLE_ERROR_PER_TAP * k2 + TWIDDLE_ERROR_BASE) * EPS64
    rho = SYMBOL_ERROR_FACTOR * (2 * eta + gamma(k2 + 8))
    # The error operator is block-banded with blocks E_a: its norm is at most sum_a ||E_a||_F.
    taps_abs = abs_sum_upper(kernel, 4)  # (G, co, ci, kh)
    err = up(rho * np.sum(norm2_upper(taps_abs, (1, 2)), axis=1) * (1 + 4 * EPS64))  # (G,)
    order = np.argsort(-column_bounds, axis=None)
    best, done = 0.0, 0
    rest = 0.0
    for flat in order:
        gi, q = divmod(int(flat), n2)
        u = float(column_bounds[gi, q])
        if u <= best:
            break
        if done >= max_frequencies:
            rest = max(rest, u)
            continue
        taps = np.einsum("oiav,v->aoi", kernel[gi], twiddle[q])
        value = float(up(svd_bound(_row_operator(layer, taps)) + err[gi]))
        best = max(best, min(value, u))
        done += 1
    return max(best, rest)


def conv_semi_explicit_bound(layer: Conv, twist: tuple[float, float],
                             max_entries: int = SEMI_EXPLICIT_MAX_ENTRIES,
                             max_frequencies: int = SEMI_EXPLICIT_MAX_FREQUENCIES) -> float:
    """Min of the rows-exact and the columns-exact bounds (the other axis a twisted circulant).

    Exact along one axis, the zero-padding gap of the circulant embedding remains along the
    other only (and the padding rows are left out): about half the gap of `conv_gram_bound`.
    Returns inf when the per-frequency matrices exceed `max_entries`.
    """
    routes = [layer, transposed(layer)]
    fits = [_row_operator_entries(r) <= max_entries for r in routes]
    if not any(fits):
        return math.inf
    per, _ = grid_bounds(polyphase(layer), twist, None)
    rows_exact = _row_exact(routes[0], twist[1], per.max(axis=1), max_frequencies) \
        if fits[0] else math.inf
    cols_exact = _row_exact(routes[1], twist[0], per.max(axis=2), max_frequencies) \
        if fits[1] else math.inf
    return min(rows_exact, cols_exact)


def _four_reshapes(j: np.ndarray) -> list[np.ndarray]:
    """The four matrices of Singla & Feizi for a kernel `(c_out, c_in, h, w)`."""
    co, ci, h, w = j.shape
    return [j.reshape(co, ci * h * w),                                   # [o, (i, a, b)]
            j.transpose(0, 2, 3, 1).reshape(co * h * w, ci),             # [(o, a, b), i]
            j.transpose(0, 2, 1, 3).reshape(co * h, ci * w),             # [(o, a), (i, b)]
            j.transpose(0, 3, 1, 2).reshape(co * w, ci * h)]             # [(o, b), (i, a)]


def _four_bound(kernel: np.ndarray) -> float:
    """`sqrt(h w) * min` of the four reshaped norms for one group's kernel."""
    h, w = kernel.shape[-2:]
    best = min(min(svd_bound(m), float(norm2_upper(m))) for m in _four_reshapes(kernel))
    return float(up(up(math.sqrt(h * w)) * best))


def fantastic_four_bound(layer: Conv) -> float:
    """Singla & Feizi's bound, min over the original (undilated) and the polyphase kernel."""
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    groups = layer.groups
    per_group = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    original = max(_four_bound(k) for k in per_group)
    pc = polyphase(layer)
    poly = max(_four_bound(k) for k in pc.kernel)
    return min(original, poly)


def conv_matrix(layer: Conv) -> scipy.sparse.csr_matrix:
    """The exact matrix of the layer's linear part (rows: outputs, columns: inputs, C order)."""
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    co, ci_g, kh, kw = w.shape
    c_in, h, wd = layer.in_shape
    _, ho, wo = layer.out_shape
    s1, s2 = layer.stride
    d1, d2 = layer.dilation
    left, _, top, _ = layer.padding
    co_g = co // layer.groups
    o = np.arange(co)[:, None, None, None]
    c = (o // co_g) * ci_g + np.arange(ci_g)[None, :, None, None]
    i = np.arange(ho)[None, None, :, None]
    j = np.arange(wo)[None, None, None, :]
    rows, cols, vals = [], [], []
    for a in range(kh):
        for b in range(kw):
            y = s1 * i + d1 * a - top
            x = s2 * j + d2 * b - left
            ok = (y >= 0) & (y < h) & (x >= 0) & (x < wd)
            shape = (co, ci_g, ho, wo)
            ok = np.broadcast_to(ok, shape)
            rows.append(np.broadcast_to((o * ho + i) * wo + j, shape)[ok])
            cols.append(np.broadcast_to((c * h + y) * wd + x, shape)[ok])
            vals.append(np.broadcast_to(w[:, :, a, b][:, :, None, None], shape)[ok])
    n_out, n_in = co * ho * wo, c_in * h * wd
    return scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_out, n_in))


def conv_explicit_bound(layer: Conv,
                        max_entries: int = EXPLICIT_MAX_ENTRIES) -> MatrixNormBound | None:
    """Dense bounds (SVD with slack, Gram, Frobenius) of the exact matrix, if small enough."""
    n_out, n_in = math.prod(layer.out_shape), math.prod(layer.in_shape)
    if n_out * n_in > max_entries:
        return None
    return matrix_norm_bound(conv_matrix(layer).toarray())


def conv_inf_norm_bound(layer: Conv) -> float:
    """Induced inf->inf norm bound: the largest sum of |weights| feeding one output."""
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    return dense_inf_norm_bound(w.reshape(w.shape[0], -1))


def conv_inf_to_two_bound(layer: Conv) -> float:
    """Induced inf->2 norm bound: `sqrt(H_out W_out sum_o (sum |w_o|)^2)`."""
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    rows = abs_sum_upper(w.reshape(w.shape[0], -1), 1)
    _, ho, wo = layer.out_shape
    return float(up(norm2_upper(rows) * up(math.sqrt(ho * wo))))


@dataclass(frozen=True)
class ConvNormBound:
    """The smallest sound bound of a convolution's L2 norm, which method gave it, and all tried."""

    value: float
    method: str
    candidates: dict[str, float] = field(default_factory=dict)
    gram: ConvGramResult | None = None


def conv_norm_bound(layer: Conv, twist_candidates: int = TWIST_CANDIDATES,
                    explicit_max_entries: int = EXPLICIT_MAX_ENTRIES) -> ConvNormBound:
    """Min over Gram iteration, Fantastic Four, the Gram deviation and (small) the exact matrix.

    A near-orthogonal layer (Gram deviation at most `ORTHOGONAL_SHORTCUT_DEVIATION`) skips the
    Gram-iteration and semi-explicit bounds, which cost seconds on large layers: its bound is
    then within 5e-6 of 1, and they could only be smaller where zero padding on a tiny image
    pulls the layer's norm below 1 (such layers are small, and keep the exact-matrix bound).
    """
    orthogonal = grouped_orthogonal_bound(polyphase(layer).kernel)
    cands = {"orthogonal": orthogonal.value, "fantastic_four": fantastic_four_bound(layer)}
    gram = None
    if orthogonal.deviation > ORTHOGONAL_SHORTCUT_DEVIATION:
        gram = conv_gram_bound(layer, twist_candidates)
        cands["gram"] = gram.value
        semi = conv_semi_explicit_bound(layer, gram.twist)
        if math.isfinite(semi):
            cands["semi_explicit"] = semi
    explicit = conv_explicit_bound(layer, explicit_max_entries)
    if explicit is not None:
        cands["explicit_" + explicit.method] = explicit.value
    method = min(cands, key=cands.get)
    return ConvNormBound(cands[method], method, cands, gram)
