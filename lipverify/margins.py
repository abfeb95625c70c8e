"""Margins and Lipschitz bounds into certificates: the arithmetic every Lipschitz certificate rests on.

One place, tested once. Each property term holds robustly at radius `r` when some row `c` of the
term has `c.f(x0) - d - r * L_c > 0`, with `L_c` a sound bound on the Lipschitz constant of
`c.f` in the perturbation's norm. All divisions and subtractions are rounded towards the safe
side: the margin down, the Lipschitz constant up, the radius down.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from lipverify.types import Certificate, Problem, Property, Status

# Relative slack added to every float64 quantity a radius is computed from. Float64 rounding of
# forward passes done in float32 is far larger than machine epsilon, so the margin is lowered by
# FORWARD_REL_ERROR of the output scale (see `forward_error`).
LIPSCHITZ_REL_SLACK = 1e-9
FORWARD_REL_ERROR = 1e-5


def forward_error(outputs: np.ndarray) -> np.ndarray:
    """A bound on the error of float32 forward passes, per input (absolute, on each output)."""
    scale = np.max(np.abs(outputs), axis=1) if outputs.size else np.zeros(len(outputs))
    return FORWARD_REL_ERROR * (1.0 + scale)


def round_down_div(num: float, den: float) -> float:
    """`num / den` rounded towards minus infinity (den > 0)."""
    q = num / den
    return float(np.nextafter(q, -np.inf))


def property_radius(prop: Property, y: np.ndarray, row_lipschitz: Callable[[np.ndarray], float],
                    error: float) -> tuple[float, float]:
    """Largest certified radius of `prop` around outputs `y`, and the worst centre margin.

    `row_lipschitz(c)` returns a sound Lipschitz bound of `x -> c.f(x)`; `error` bounds the
    absolute error in each computed output.
    """
    radius = math.inf
    worst = math.inf
    for c, d in prop.terms:
        best_term = 0.0
        best_margin = -math.inf
        for row, rhs in zip(c, d, strict=True):
            slack = float(row @ y - rhs)
            margin = slack - error * float(np.sum(np.abs(row)))
            best_margin = max(best_margin, slack)
            if margin <= 0:
                continue
            lip = row_lipschitz(row) * (1 + LIPSCHITZ_REL_SLACK)
            r = math.inf if lip == 0 else round_down_div(margin, lip)
            best_term = max(best_term, r)
        radius = min(radius, best_term)
        worst = min(worst, best_margin)
    return (0.0 if radius == math.inf and not prop.terms else radius), worst


def robust_radii(outputs: np.ndarray, labels: np.ndarray, pair_lipschitz: np.ndarray) -> np.ndarray:
    """Vectorised radii for robustness: `min_j (f_y - f_j - err) / L_yj`, rounded down.

    `pair_lipschitz[y, j]` is a sound bound on the Lipschitz constant of `f_y - f_j`.
    """
    n, k = outputs.shape
    rows = np.arange(n)
    err = 2 * forward_error(outputs)
    margins = outputs[rows, labels][:, None] - outputs - err[:, None]
    lip = pair_lipschitz[labels] * (1 + LIPSCHITZ_REL_SLACK)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        radii = np.where(margins > 0, margins / lip, 0.0)
    radii = np.where((margins > 0) & (lip == 0), np.inf, radii)
    radii[rows, labels] = np.inf
    radius = np.nextafter(np.min(radii, axis=1), -np.inf)
    return np.maximum(radius, 0.0)


def certificates_from_radii(radii: Sequence[float], eps: float, backend: str, seconds: float,
                            details: Sequence[dict] | None = None) -> list[Certificate]:
    """Verified where the certified radius reaches `eps`, unknown otherwise."""
    per = seconds / max(len(radii), 1)
    out = []
    for i, r in enumerate(radii):
        status = Status.VERIFIED if r >= eps and r > 0 else Status.UNKNOWN
        out.append(Certificate(status, backend, float(r), seconds=per,
                               details=details[i] if details else {}))
    return out


def margin_certificates(problem: Problem, outputs: np.ndarray,
                        row_lipschitz: Callable[[np.ndarray], float], backend: str,
                        seconds: float) -> list[Certificate]:
    """Certificates of general properties from centre outputs and row Lipschitz bounds."""
    errs = forward_error(outputs)
    radii = []
    details = []
    for prop, y, e in zip(problem.properties, outputs, errs, strict=True):
        r, worst = property_radius(prop, y, row_lipschitz, float(e))
        radii.append(r)
        details.append({"centre_margin": worst})
    return certificates_from_radii(radii, problem.perturbation.eps, backend, seconds, details)
