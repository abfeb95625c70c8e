"""ECLipsE's layer-by-layer matrix inequalities, proven in float64 before they become bounds.

Xu & Sivaranjani, "ECLipsE: Efficient Compositional Lipschitz Constant Estimation for Deep
Neural Networks", NeurIPS 2024 (https://openreview.net/forum?id=61YYSy078Z).

For a chain `f(x) = last @ phi_L(W_L ... phi_1(W_1 x))` whose activations have difference
quotients in `[lo, hi]` per neuron, write `p = lo * hi`, `m = (lo + hi) / 2`. For any
multipliers `lambda_i >= 0`, the slope condition of layer `i` gives, for differences `y` of its
inputs and `z` of its outputs (`u = W_i y`):

    QC_i = sum_k lambda_k (z_k - lo_k u_k)(hi_k u_k - z_k) = -u'PLu + 2 u'MLz - z'Lz >= 0.

A symmetric `Y_i` with `Y_0 = I` and, at every stage, the block matrix

    M_i = [[Y_{i-1} + W_i' P L W_i,  -W_i' M L],
           [-L M W_i,                 L - Y_i ]]  >= 0                                   (*)

gives `z'Y_i z <= y'Y_{i-1}y - QC_i <= y'Y_{i-1}y`, so `v_L' Y_L v_L <= ||x - x'||^2` for the
last hidden differences. Then `rho Y_L - R'R >= 0` proves `||R v_L|| <= sqrt(rho) ||x - x'||`
for an output map `R` (`last`, or a row `c' last` for one margin). Nothing else is assumed:
neither the solver's accuracy nor that `Y_i` is the exact ECLipsE recursion.

Each `Y_i` is ECLipsE's `X_i = L - L M W_i A^-1 W_i' M L` (`A = Y_{i-1} + W_i' P L W_i`),
which makes the Schur complement of (*) zero, minus `delta I`; `delta` is raised until (*) is
proven: its smallest computed eigenvalue exceeds a margin covering the rounding in forming the
matrix and the eigensolver's backward error (the same margin lipverify's `lipsdp` check uses).
`rho` is raised the same way until `rho Y_L - R'R >= 0` is proven.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from lipverify.errors import LipverifyError
from lipverify.sdp.check import EIG_ERROR_FACTOR, EPS64, PRODUCT_DEPTH, gamma

# Tries at raising `delta` (stages) or `rho` (the last map), and the factor between tries.
RAISE_TRIES = 8
RAISE_FACTOR = 10.0
# First relative raise of `rho` above its float estimate.
RHO_REL_RAISE = 1e-12


# Candidate multipliers for stage `i` given the proven `Y_{i-1}`, best first: (lambdas, source).
Chooser = Callable[[int, np.ndarray], Iterable[tuple[np.ndarray, str]]]


class CertificateError(LipverifyError):
    """Multipliers that cannot be turned into a proven ECLipsE bound."""


def psd_margin(dense: np.ndarray, dense_abs: np.ndarray, terms: int) -> float:
    """How far above zero the computed smallest eigenvalue of `dense` must be to prove `>= 0`.

    `dense_abs` bounds the entries' magnitudes before cancellation and `terms` the summands in
    one entry: `|fl(M) - M| <= gamma(terms + depth) |M|_abs`; the eigensolver adds
    `EIG_ERROR_FACTOR * n * eps * ||M||`. Doubled because the norms are rounded too.
    """
    form_err = gamma(terms + PRODUCT_DEPTH) * float(np.linalg.norm(dense_abs))
    eig_err = EIG_ERROR_FACTOR * dense.shape[0] * EPS64 * float(np.linalg.norm(dense))
    return 2.0 * (form_err + eig_err)


def min_eigenvalue(dense: np.ndarray) -> float:
    """Smallest eigenvalue of a symmetric matrix (float64 LAPACK)."""
    return float(sla.eigvalsh(dense, subset_by_index=[0, 0])[0])


def symmetric(mat: np.ndarray) -> np.ndarray:
    """`(M + M') / 2`, exactly symmetric."""
    out = (mat + mat.T) / 2
    upper = np.triu(out)
    return upper + np.triu(out, 1).T


@dataclass(frozen=True)
class StageCheck:
    """How stage `(*)` was proven: `min_eig >= margin` after `tries` raises of `delta`."""

    delta: float
    min_eig: float
    margin: float
    tries: int
    multipliers: str


@dataclass(frozen=True)
class Slopes:
    """`p = lo * hi` and `m = (lo + hi) / 2` per neuron."""

    p: np.ndarray
    m: np.ndarray

    @classmethod
    def of(cls, lo: np.ndarray, hi: np.ndarray) -> Slopes:
        """From the slope interval (per neuron)."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        if np.any(lo < 0):
            raise CertificateError("ECLipsE needs activation slopes >= 0")
        return cls(lo * hi, (lo + hi) / 2)


def stage_matrix(y_prev: np.ndarray, w: np.ndarray, lam: np.ndarray, s: Slopes,
                 y_next: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """`M_i` of `(*)`, an entrywise bound of its terms' magnitudes, and terms per entry."""
    lp, lm = lam * s.p, lam * s.m
    top = y_prev + (w.T * lp) @ w
    cross = -(w.T * lm)
    bottom = np.diag(lam) - y_next
    dense = np.block([[top, cross], [cross.T, bottom]])
    top_abs = np.abs(y_prev) + (np.abs(w).T * np.abs(lp)) @ np.abs(w)
    bottom_abs = np.diag(np.abs(lam)) + np.abs(y_next)
    dense_abs = np.block([[top_abs, np.abs(cross)], [np.abs(cross).T, bottom_abs]])
    return symmetric(dense), dense_abs, w.shape[0] + 2


def candidate_y(y_prev: np.ndarray, w: np.ndarray, lam: np.ndarray,
                s: Slopes) -> tuple[np.ndarray, float]:
    """ECLipsE's `X_i` (the Schur complement of `(*)` vanishes) and `||A^-1 B||_F^2`."""
    a = symmetric(y_prev + (w.T * (lam * s.p)) @ w)
    b = w.T * (lam * s.m)
    try:
        chol = sla.cho_factor(a, lower=True)
    except np.linalg.LinAlgError as exc:
        raise CertificateError("the previous stage left a matrix that is not positive "
                               "definite") from exc
    c = sla.cho_solve(chol, b)
    return symmetric(np.diag(lam) - b.T @ c), float(np.sum(c * c))


def _require_positive_definite(y: np.ndarray, source: str) -> None:
    """`Y_i` must be positive definite for the next stage or the output map to use it."""
    try:
        sla.cholesky(y, lower=True)
    except np.linalg.LinAlgError:
        raise CertificateError(f"the {source} multipliers leave the next matrix indefinite "
                               "(too large)") from None


def prove_stage(y_prev: np.ndarray, w: np.ndarray, lam: np.ndarray, s: Slopes,
                source: str) -> tuple[np.ndarray, StageCheck]:
    """`Y_i` for which `(*)` is proven, with how it was proven.

    Raises:
        CertificateError: the multipliers do not give a provable stage.
    """
    lam = np.maximum(np.asarray(lam, np.float64), 0.0)
    if not np.all(np.isfinite(lam)) or not np.any(lam > 0):
        raise CertificateError("multipliers are all zero or not finite")
    x, coupling = candidate_y(y_prev, w, lam, s)
    eye = np.eye(len(x))
    dense, dense_abs, terms = stage_matrix(y_prev, w, lam, s, x)
    # The smallest eigenvalue of (*) is about delta / (1 + ||A^-1 B||^2): aim above the margin.
    delta = 4.0 * psd_margin(dense, dense_abs, terms) * (1.0 + coupling)
    for tries in range(RAISE_TRIES):
        y = x - delta * eye
        dense, dense_abs, terms = stage_matrix(y_prev, w, lam, s, y)
        margin = psd_margin(dense, dense_abs, terms)
        low = min_eigenvalue(dense)
        if low >= margin:
            _require_positive_definite(y, source)
            return y, StageCheck(delta, low, margin, tries, source)
        delta *= RAISE_FACTOR
    raise CertificateError(f"stage inequality not proven after {RAISE_TRIES} raises (smallest "
                           f"eigenvalue {low:.3g}, margin {margin:.3g}); its multipliers leave "
                           "the next matrix (nearly) singular")


def prove_output(y: np.ndarray, rows: np.ndarray) -> float:
    """The smallest proven `rho` with `rho Y - R'R >= 0` for the output map `rows` (R x n).

    Raises:
        CertificateError: no `rho` could be proven (Y is not positive definite).
    """
    rows = np.atleast_2d(np.asarray(rows, np.float64))
    gram = symmetric(rows.T @ rows)
    gram_abs = np.abs(rows).T @ np.abs(rows)
    try:
        estimate = float(sla.eigh(gram, y, eigvals_only=True, subset_by_index=[len(y) - 1] * 2)[0])
    except np.linalg.LinAlgError as exc:
        raise CertificateError("the last stage left a matrix that is not positive "
                               "definite") from exc
    if estimate <= 0:
        estimate = 0.0
    raise_rel = RHO_REL_RAISE
    scale = float(np.linalg.norm(gram)) / max(float(np.linalg.norm(y)), 1e-300)
    for _ in range(RAISE_TRIES):
        rho = estimate * (1 + raise_rel) + raise_rel * scale
        dense = symmetric(rho * y - gram)
        dense_abs = rho * np.abs(y) + gram_abs
        margin = psd_margin(dense, dense_abs, rows.shape[0] + 2)
        if min_eigenvalue(dense) >= margin:
            return rho
        raise_rel *= RAISE_FACTOR**2
    raise CertificateError("the output inequality was not proven for any rho tried")


def round_up(value: float) -> float:
    """The next float above `value` (covers the rounding of one operation)."""
    return float(np.nextafter(value, math.inf))


@dataclass(frozen=True, eq=False)
class ChainCertificate:
    """Proven stages of a chain: `Y_L` bounds every output map's Lipschitz constant.

    `lambdas` are the multipliers each stage was proven with (clipped to `>= 0`).
    """

    y_last: np.ndarray
    last: np.ndarray
    stages: tuple[StageCheck, ...]
    lambdas: tuple[np.ndarray, ...]

    def bound(self, rows: np.ndarray | None = None) -> float:
        """A proven L2 Lipschitz bound of `x -> rows @ v_L` (default rows: `last`)."""
        rho = prove_output(self.y_last, self.last if rows is None else rows)
        return round_up(math.sqrt(rho))

    def row_bound(self, row: np.ndarray) -> float:
        """A proven L2 Lipschitz bound of `x -> row . f(x)` (`row` on the outputs)."""
        return self.bound(np.atleast_2d(np.asarray(row, np.float64)) @ self.last)


def prove_chain(weights: Sequence[np.ndarray], slopes: Sequence[Slopes],
                last: np.ndarray, choose: Chooser) -> ChainCertificate:
    """Prove every stage with the first candidate multipliers from `choose` that work.

    Raises:
        CertificateError: no candidate proves some stage.
    """
    y = np.eye(weights[0].shape[1])
    checks, lambdas = [], []
    for i, (w, s) in enumerate(zip(weights, slopes, strict=True)):
        errors = []
        for lam, source in choose(i, y):
            try:
                y_next, check = prove_stage(y, w, lam, s, source)
                lambdas.append(np.maximum(np.asarray(lam, np.float64), 0.0))
                break
            except CertificateError as exc:
                errors.append(f"{source}: {exc}")
        else:
            raise CertificateError(f"stage {i + 1}: " + "; ".join(errors))
        y = y_next
        checks.append(check)
    return ChainCertificate(y, np.asarray(last, np.float64), tuple(checks), tuple(lambdas))
