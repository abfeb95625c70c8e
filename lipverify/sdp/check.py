"""Turn a solver's multipliers into a proven bound: repair `rho`, then check `M(t) <= 0` in float64.

The solver's answer is never trusted. Given its multipliers `lambda` (clipped to `>= 0`, which
the quadratic constraints need), `M(rho) = M_lambda - rho E_0` only moves the input block, so
with `X, C, H` the input, cross and hidden blocks of `M_lambda`:

    M(rho) + mu I <= 0  <=>  H + mu I < 0  and  rho >= mu + lambda_max(X + C (-(H + mu I))^-1 C^T)

(Schur complement). That gives the smallest `rho` these multipliers support, however inaccurate
the solve was; it is then proven by a float64 eigenvalue computation on the dense full matrix
(never the reduced one), with the margin `mu` covering both the rounding in forming `M` and the
eigenvalue solver's backward error. If the check fails, `rho` is raised and checked again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from lipverify.errors import LipverifyError
from lipverify.sdp.assembly import LMI

log = logging.getLogger(__name__)

EPS64 = float(np.finfo(np.float64).eps)
# The computed eigenvalues of a symmetric matrix lie within EIG_ERROR_FACTOR * N * eps * ||M||_2
# of the exact ones (backward stability of LAPACK's symmetric eigensolvers; the constant is
# generous, the textbook bound is a low-degree polynomial in N times eps).
EIG_ERROR_FACTOR = 16.0
# Every product and sum forming M is rounded; entries are sums of at most K terms, each term a
# product of at most PRODUCT_DEPTH floats, so |fl(M) - M| <= gamma_K |M|_abs entrywise.
PRODUCT_DEPTH = 6
# Relative and absolute push of rho above the Schur value, and how much more on each retry.
REPAIR_REL = 1e-9
REPAIR_RETRY_FACTOR = 100.0
REPAIR_RETRIES = 6
# Multipliers at exactly 0 leave a zero on the hidden block's diagonal, which no rho can make
# strictly negative: they are raised to a floor relative to the largest multiplier, then, if the
# hidden block is still not negative definite (an inaccurate solve), scaled up a little. Each
# pair is (floor relative to max lambda, scale factor), tried in order.
LAMBDA_REPAIRS = ((1e-9, 1.0), (1e-7, 1.0), (1e-6, 1.0 + 1e-6), (1e-5, 1.0 + 1e-4),
                  (1e-4, 1.0 + 1e-2), (1e-3, 1.1))


class CertificationError(LipverifyError):
    """The multipliers cannot be turned into a proven bound (the hidden block is not negative)."""


@dataclass(frozen=True)
class CheckResult:
    """A proven `M(rho, lambda) <= 0`: `max_eig` (computed) is below `-margin`."""

    rho: float
    lambdas: np.ndarray
    max_eig: float
    margin: float
    retries: int


def gamma(k: int) -> float:
    """`k eps / (1 - k eps)`: the relative error bound of a k-term float sum of products."""
    return k * EPS64 / (1 - k * EPS64)


def error_margin(lmi: LMI, t: np.ndarray, dense: np.ndarray, terms: int) -> float:
    """A bound on `|lambda_max(computed) - lambda_max(M exact)|` for the dense matrix `dense`.

    `terms` is the largest number of summands in one entry of `M`.
    """
    form_err = gamma(terms + PRODUCT_DEPTH) * float(np.linalg.norm(lmi.dense_abs(t)))
    eig_err = EIG_ERROR_FACTOR * lmi.size * EPS64 * float(np.linalg.norm(dense))
    return 2.0 * (form_err + eig_err)  # x2: the norms above are themselves rounded


def max_terms(lmi: LMI) -> int:
    """Largest number of summands in one entry of `M` (for `gamma`)."""
    # Variables per entry, plus (layer form) the neurons summed into one coefficient, plus M0.
    per_entry = int(np.max(np.diff(lmi.coeffs.indptr))) if lmi.coeffs.nnz else 0
    return per_entry + lmi.size + lmi.const_terms + 1


def schur_rho(lmi: LMI, lambdas: np.ndarray, mu: float) -> float:
    """Smallest `rho` with `M(rho, lambdas) + mu I <= 0` (float estimate), or inf if none."""
    m = lmi.dense(np.concatenate([[0.0], lambdas]))
    n0 = lmi.input_size
    x, c, h = m[:n0, :n0], m[:n0, n0:], m[n0:, n0:]
    g = -(h + mu * np.eye(h.shape[0]))
    try:
        chol = sla.cholesky(g, lower=True)
    except np.linalg.LinAlgError:
        return math.inf
    y = sla.solve_triangular(chol, c.T, lower=True)
    s = x + y.T @ y
    top = float(sla.eigvalsh(s, subset_by_index=[n0 - 1, n0 - 1])[0])
    return mu + max(top, 0.0)


def max_eigenvalue(dense: np.ndarray) -> float:
    """Largest eigenvalue of a symmetric matrix (float64 LAPACK)."""
    n = dense.shape[0]
    return float(sla.eigvalsh(dense, subset_by_index=[n - 1, n - 1])[0])


def certify_multipliers(lmi: LMI, lambdas: np.ndarray, rho_hint: float) -> CheckResult:
    """The smallest checked `rho` for `lambdas` (clipped to >= 0) with `M(rho, lambdas) <= 0`.

    `lmi` must be the full (unreduced) LMI of the network the bound is about. Raises
    `CertificationError` when no `rho` works for these multipliers.
    """
    raw = np.maximum(np.asarray(lambdas, np.float64), 0.0)
    top_lambda = float(np.max(raw)) if raw.size else 0.0
    if not top_lambda > 0 or not math.isfinite(top_lambda):
        raise CertificationError("the solver's multipliers are all zero or not finite: the "
                                 "hidden block of the LipSDP matrix cannot be negative")
    terms = max_terms(lmi)
    rho = math.inf
    for floor, scale in LAMBDA_REPAIRS:
        lambdas = np.maximum(raw, floor * top_lambda) * scale
        # A first margin from a generous rho; the final check recomputes it at the final rho.
        probe = np.concatenate([[max(rho_hint, 0.0) * 2 + 1.0], lambdas])
        mu = error_margin(lmi, probe, lmi.dense(probe), terms)
        rho = schur_rho(lmi, lambdas, mu)
        if math.isfinite(rho):
            break
    if not math.isfinite(rho):
        raise CertificationError("the solver's multipliers leave the hidden block of the LipSDP "
                                 "matrix indefinite: no rho can be certified with them")
    bump = REPAIR_REL
    for attempt in range(REPAIR_RETRIES):
        rho_try = rho * (1 + bump) + bump * mu
        t = np.concatenate([[rho_try], lambdas])
        dense = lmi.dense(t)
        margin = error_margin(lmi, t, dense, terms)
        top = max_eigenvalue(dense)
        if top <= -margin:
            return CheckResult(float(rho_try), lambdas, top, margin, attempt)
        log.debug("LipSDP check failed at rho=%.17g (max eig %.3g, margin %.3g); raising rho",
                  rho_try, top, margin)
        bump *= REPAIR_RETRY_FACTOR
        mu = max(mu, margin)
    raise CertificationError(f"could not certify the LipSDP matrix inequality after "
                             f"{REPAIR_RETRIES} increases of rho (last max eigenvalue {top:.3g}, "
                             f"margin {margin:.3g})")
