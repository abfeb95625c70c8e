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

from lipverify.network.rounding import UNIT_ROUNDOFF, SoundOutputs, gamma
from lipverify.types import Certificate, Problem, Property, Status

# Relative slack added to every Lipschitz bound a radius is computed from.
LIPSCHITZ_REL_SLACK = 1e-9
# Allowance for the float32 rounding of bounds computed by libraries that work in float32
# (auto_LiRPA), relative to the output scale (see `forward_error`).
FORWARD_REL_ERROR = 1e-5


def forward_error(outputs: np.ndarray) -> np.ndarray:
    """An allowance for float32 rounding in bounds near `outputs`, per input (absolute).

    Not a proof: centre margins use `lipverify.network.rounding.sound_outputs`, whose error
    bound follows the activations through every layer.
    """
    scale = np.max(np.abs(outputs), axis=1) if outputs.size else np.zeros(len(outputs))
    return FORWARD_REL_ERROR * (1.0 + scale)


def round_down_div(num: float, den: float) -> float:
    """`num / den` rounded towards minus infinity (den > 0)."""
    q = num / den
    return float(np.nextafter(q, -np.inf))


def property_radius(prop: Property, y: np.ndarray, row_lipschitz: Callable[[np.ndarray], float],
                    error: np.ndarray | float) -> tuple[float, float]:
    """Largest certified radius of `prop` around outputs `y`, and the worst centre margin.

    `row_lipschitz(c)` returns a sound Lipschitz bound of `x -> c.f(x)`; `error` bounds the
    absolute error of each computed output (one per output, or one for all).
    """
    error = np.broadcast_to(np.asarray(error, dtype=np.float64), np.shape(y))
    # `row @ y - rhs` is itself computed in float64.
    rounding_rhs = gamma(len(y) + 1)
    rounding = rounding_rhs * np.abs(y)
    radius = math.inf
    worst = math.inf
    for c, d in prop.terms:
        best_term = 0.0
        best_margin = -math.inf
        for row, rhs in zip(c, d, strict=True):
            slack = float(row @ y - rhs)
            margin = slack - float(np.abs(row) @ (error + rounding)) - rounding_rhs * abs(rhs)
            best_margin = max(best_margin, slack)
            if margin <= 0:
                continue
            lip = row_lipschitz(row) * (1 + LIPSCHITZ_REL_SLACK)
            r = math.inf if lip == 0 else round_down_div(margin, lip)
            best_term = max(best_term, r)
        radius = min(radius, best_term)
        worst = min(worst, best_margin)
    return (0.0 if radius == math.inf and not prop.terms else radius), worst


def robust_radii(outputs: SoundOutputs, labels: np.ndarray, pair_lipschitz: np.ndarray) -> np.ndarray:
    """Vectorised radii for robustness: `min_j (f_y - f_j - err_y - err_j) / L_yj`, rounded down.

    `outputs` carries the centre outputs with their error bounds; `pair_lipschitz[y, j]` is a
    sound bound on the Lipschitz constant of `f_y - f_j`.
    """
    values, error = outputs.values, outputs.error
    n, k = values.shape
    rows = np.arange(n)
    # Each margin is the float64 difference of two outputs: one more rounding of each.
    error = error + 2 * UNIT_ROUNDOFF * np.abs(values)
    margins = values[rows, labels][:, None] - values - error[rows, labels][:, None] - error
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


def margin_certificates(problem: Problem, outputs: SoundOutputs,
                        row_lipschitz: Callable[[np.ndarray], float], backend: str,
                        seconds: float) -> list[Certificate]:
    """Certificates of general properties from centre outputs and row Lipschitz bounds."""
    radii = []
    details = []
    for prop, y, e in zip(problem.properties, outputs.values, outputs.error, strict=True):
        r, worst = property_radius(prop, y, row_lipschitz, e)
        radii.append(r)
        details.append({"centre_margin": worst})
    return certificates_from_radii(radii, problem.perturbation.eps, backend, seconds, details)
