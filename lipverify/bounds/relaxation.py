"""The ReLU step of L2-aware backward bound propagation: slopes and the coupled offset.

At a ReLU layer `a = relu(z)` the backward pass holds coefficients `p` on `a` and must return
coefficients `g` on `z` and an offset `h` with

    p . relu(z) >= g . z + h    for every reachable z,

where every reachable `z` lies in the box `[l, u]` and in the ball `||z - c|| <= r`.
For ANY `g` and ANY `lam >= 0`, weak Lagrangian duality on the ball constraint gives

    min_{z in box, ||z - c|| <= r} (p . relu(z) - g . z)
        >= -lam r^2 / 2 + sum_i min_{l_i <= t <= u_i} [p_i relu(t) - g_i t + lam/2 (t - c_i)^2]

because the added term `lam/2 (||z - c||^2 - r^2)` is <= 0 on the feasible set and the relaxed
problem separates per coordinate. Each one-dimensional minimum is over two convex quadratic
pieces (t >= 0 and t <= 0) and is attained at the clamped stationary point of each piece:
computed in closed form, so the offset is exact for the given `g`, `lam` (no inner solver).

- `lam = 0` gives exactly CROWN's offset for CROWN slopes (the box minimum of `p relu(t) - g t`),
  so maximising over `lam >= 0` (including 0) can only tighten CROWN.
- Without the box (`l = -inf`, `u = inf`) it is SDP-CROWN's offset (Chiu, Chen, Zhang, Zhang,
  ICML 2025, arXiv 2506.06665, the `h(g, lambda)` of their ReLU theorem).

`g = p * slope` with CROWN's slopes: 1 on active neurons, 0 on dead ones; on unstable neurons
an optimisable slope in `[0, 1]`, initialised to CROWN's adaptive lower slope where `p >= 0` and
to the upper slope `u / (u - l)` where `p < 0`. Any slope is sound here (the offset adapts to
it), the choice only affects tightness; unlike plain CROWN the upper slope is worth optimising
too, since with `lam > 0` the chord is no longer the best choice.
The multiplier `lam` is chosen per objective row by a safeguarded Newton search on the concave
dual function; any `lam` it returns is valid, so the search needs no precision guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Newton steps (in log lam) of the multiplier search, and the largest step per iteration.
LAMBDA_NEWTON_STEPS = 10
# Newton steps when warm-started from the previous optimisation step's multipliers.
LAMBDA_WARM_STEPS = 3
LAMBDA_MAX_LOG_STEP = 4.0
# A multiplier below this (relative to its natural scale) is treated as 0.
LAMBDA_FLOOR = 1e-12


@dataclass(frozen=True, eq=False)
class ReluBounds:
    """What is known about one ReLU layer's pre-activation `z` over the input ball, per input.

    `lower`, `upper`, `centre`: `(B, n)`; `radius`: `(B,)`, with `||z(x) - centre|| <= radius`
    and `lower <= z(x) <= upper` for every `x` in the ball.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    centre: torch.Tensor
    radius: torch.Tensor

    @property
    def unstable(self) -> torch.Tensor:
        """Neurons whose sign is not fixed over the ball."""
        return (self.lower < 0) & (self.upper > 0)

    def select(self, index: torch.Tensor) -> ReluBounds:
        """The bounds of the neurons `index` only (same radius)."""
        return ReluBounds(self.lower[:, index], self.upper[:, index], self.centre[:, index],
                          self.radius)

    def of_inputs(self, index: torch.Tensor) -> ReluBounds:
        """The bounds of the inputs `index` of the batch only."""
        return ReluBounds(self.lower[index], self.upper[index], self.centre[index],
                          self.radius[index])

    def upper_slope(self) -> torch.Tensor:
        """CROWN's upper slope `u / (u - l)` on unstable neurons (1 active, 0 dead)."""
        lo, hi = self.lower.clamp(max=0), self.upper.clamp(min=0)
        width = (hi - lo).clamp(min=torch.finfo(hi.dtype).tiny)
        slope = hi / width
        return torch.where(self.lower >= 0, torch.ones_like(slope), slope)

    def initial_alpha(self) -> torch.Tensor:
        """CROWN's adaptive lower slope: 1 where `u > -l`, else 0."""
        return (self.upper > -self.lower).to(self.lower.dtype)


def relu_slopes(bounds: ReluBounds, p: torch.Tensor, alpha: torch.Tensor | None,
                upper_alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Slopes `s` with `g = p * s` for coefficients `p` `(B, S, n)`.

    `alpha` `(B, S, n)` are the slopes used where `p >= 0` (None: CROWN's adaptive lower slope)
    and `upper_alpha` those where `p < 0` (None: CROWN's upper slope `u / (u - l)`). Every
    slope in `[0, 1]` is sound with the coupled offset; stable neurons keep 1 (active) or 0.
    """
    upper = (bounds.upper_slope().unsqueeze(1) if upper_alpha is None
             else upper_alpha.clamp(0.0, 1.0))
    lower_alpha = (bounds.initial_alpha().unsqueeze(1) if alpha is None
                   else alpha.clamp(0.0, 1.0))
    active = (bounds.lower >= 0).unsqueeze(1)
    dead = (bounds.upper <= 0).unsqueeze(1)
    slope = torch.where(p >= 0, lower_alpha, upper)
    slope = torch.where(active, torch.ones_like(slope), slope)
    return torch.where(dead, torch.zeros_like(slope), slope)


def _piece_minima(p: torch.Tensor, g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  c: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate: the minimum over `[lo, hi]` of `p relu(t) - g t + lam/2 (t - c)^2`.

    Returns the minimum value and the minimiser. `lam` broadcasts as `(B, S, 1)`.
    """
    lam_safe = lam.clamp(min=LAMBDA_FLOOR)
    pos_lo, neg_hi = lo.clamp(min=0), hi.clamp(max=0)
    # Piece t >= 0: (p - g) t + lam/2 (t - c)^2, stationary at c - (p - g)/lam.
    t_pos = torch.minimum(torch.maximum(c - (p - g) / lam_safe, pos_lo), hi)
    v_pos = (p - g) * t_pos + 0.5 * lam * (t_pos - c) ** 2
    # Piece t <= 0: -g t + lam/2 (t - c)^2, stationary at c + g/lam.
    t_neg = torch.minimum(torch.maximum(c + g / lam_safe, lo), neg_hi)
    v_neg = -g * t_neg + 0.5 * lam * (t_neg - c) ** 2
    inf = torch.full_like(v_pos, torch.inf)
    v_pos = torch.where(hi >= 0, v_pos, inf)
    v_neg = torch.where(lo <= 0, v_neg, inf)
    take_pos = v_pos <= v_neg
    return torch.where(take_pos, v_pos, v_neg), torch.where(take_pos, t_pos, t_neg)


def coupled_offset(bounds: ReluBounds, p: torch.Tensor, g: torch.Tensor,
                   lam: torch.Tensor) -> torch.Tensor:
    """The offset `h(g, lam)` `(B, S)`: `p . relu(z) >= g . z + h` on the box and ball.

    `p`, `g`: `(B, S, n)`; `lam`: `(B, S)`, `lam >= 0`.
    """
    lam = lam.to(p.dtype).clamp(min=0)
    lam3 = lam.unsqueeze(-1)
    lo, hi, c = (t.unsqueeze(1) for t in (bounds.lower, bounds.upper, bounds.centre))
    values, _ = _piece_minima(p, g, lo, hi, c, lam3)
    r2 = bounds.radius.to(p.dtype).unsqueeze(1) ** 2
    return values.sum(-1) - 0.5 * lam * r2


@torch.no_grad()
def best_multiplier(bounds: ReluBounds, p: torch.Tensor, g: torch.Tensor,
                    init: torch.Tensor | None = None) -> torch.Tensor:
    """A good `lam >= 0` `(B, S)` for `coupled_offset` (a maximiser of the concave dual).

    The derivative of the dual in `lam` is `(sum_i (t_i* - c_i)^2 - r^2) / 2` (envelope theorem),
    decreasing in `lam`; Newton steps in `log lam` on that root, clipped, from the natural scale
    `||p - g|| / r`, or from `init` (e.g. the previous optimisation step's multipliers, which
    move little between steps) where it is positive, with fewer steps. Returns 0 where the dual
    is already maximal at `lam = 0`. Any returned value is valid: only tightness depends on it.
    """
    # The search runs in float32 (the multiplier is not a soundness input); the final
    # comparison with lam = 0 and every offset the caller uses are float64.
    f32 = torch.float32
    lo, hi, c = (t.unsqueeze(1).to(f32) for t in (bounds.lower, bounds.upper, bounds.centre))
    p32, g32 = p.to(f32), g.to(f32)
    radius = bounds.radius.to(f32)
    r2 = (radius ** 2).unsqueeze(1).expand(p.shape[:2])
    # Natural scale from this input's unstable neurons only (others add nothing to the dual).
    unstable = ((lo < 0) & (hi > 0)).to(f32)
    scale = torch.linalg.vector_norm(torch.maximum((p32 - g32).abs(), g32.abs()) * unstable,
                                     dim=-1)
    scale = scale / radius.unsqueeze(1).clamp(min=torch.finfo(f32).tiny)
    log_lam = torch.log(scale.clamp(min=LAMBDA_FLOOR))
    steps = LAMBDA_NEWTON_STEPS
    if init is not None and init.shape == log_lam.shape:
        warm = init.to(f32) > 0
        log_lam = torch.where(warm, torch.log(init.to(f32).clamp(min=LAMBDA_FLOOR)), log_lam)
        steps = LAMBDA_WARM_STEPS if bool(warm.all()) else LAMBDA_NEWTON_STEPS
    for _ in range(steps):
        lam = torch.exp(log_lam).unsqueeze(-1)
        _, t = _piece_minima(p32, g32, lo, hi, c, lam)
        dist2 = (t - c) ** 2
        interior = (t > lo) & (t < hi) & (t != 0)
        phi = dist2.sum(-1) - r2
        dphi = -2.0 * (dist2 * interior).sum(-1)
        step = torch.where(dphi < 0, -phi / dphi.clamp(max=-torch.finfo(f32).tiny),
                           torch.where(phi > 0, torch.full_like(phi, LAMBDA_MAX_LOG_STEP),
                                       torch.full_like(phi, -LAMBDA_MAX_LOG_STEP)))
        log_lam = log_lam + step.clamp(-LAMBDA_MAX_LOG_STEP, LAMBDA_MAX_LOG_STEP)
    lam = torch.exp(log_lam).to(p.dtype)
    h_lam = coupled_offset(bounds, p, g, lam)
    h_zero = coupled_offset(bounds, p, g, torch.zeros_like(lam))
    return torch.where(h_lam > h_zero, lam, torch.zeros_like(lam))
