"""Backward linear bound propagation over an L2 ball, with the coupled ReLU offset.

For objective rows `A` on the pre-activation (or output) `z_K` of block `K`, a lower bound of
`A . z_K(x)` over `||x - x0|| <= rho` is built backwards, keeping `A . z_K(x) >= L . v + beta`
for the current variable `v`:

1. block `k` (affine, exact): `L . T_k(a) = (T_k^* L) . a + L . T_k(0)`;
2. ReLU `k` (`a = relu(z)`, see `relaxation`): `L . relu(z) >= g . z + h(g, lam)`, where only
   unstable neurons contribute to `h`: for an active neuron (`g_i = p_i`, `l_i > 0`) the term
   `min_t lam/2 (t - c_i)^2` over the box is 0, for a dead one (`g_i = 0`) likewise, since the
   centre lies in the box (were it outside by rounding, 0 would still be a lower bound);
3. input: `L . x >= L . x0 - rho ||L||_2` (Cauchy-Schwarz, attained on the ball).

Optionally the bound is also closed at every ReLU output `a_k`, before relaxing it:
`L . a_k(x) >= L . a_k(x0) - ||L restricted to live neurons|| R_k` with `R_k` a bound on
`||a_k(x) - a_k(x0)||` (a local Lipschitz argument); the result is the best of all closings,
each a valid lower bound.

Every step is an inequality valid for every `x` in the ball, for every slope in `[0, 1]` and
every `lam >= 0`, so the result is a lower bound whatever the optimiser did. Arithmetic is in
float64; `Propagated.magnitude` sums the absolute values of the terms added, from which the
caller derives a rounding allowance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipverify.bounds.chain import Chain
from lipverify.bounds.relaxation import (
    ReluBounds,
    best_multiplier,
    coupled_offset,
    relu_slopes,
)


@dataclass(frozen=True)
class Propagated:
    """A lower bound `(B, S)` of the objective rows and the magnitude of what it summed."""

    bound: torch.Tensor
    magnitude: torch.Tensor


Slopes = tuple[torch.Tensor, torch.Tensor]


def propagate(chain: Chain, end: int, rows: torch.Tensor, x0: torch.Tensor, rho: torch.Tensor,
              relus: Sequence[ReluBounds], alphas: Sequence[Slopes] | None = None,
              couple: bool = True, close_early: bool = True,
              lam_state: dict[int, torch.Tensor] | None = None) -> Propagated:
    """Lower bound of `rows . z_end(x)` over the ball, `z_end` the output of block `end`.

    Args:
        chain: the network.
        end: the block whose output the rows weigh (`chain.num_relus` for the logits).
        rows: `(B, S, n_end)` objective rows per input.
        x0: `(B, *input_shape)` ball centres.
        rho: `(B,)` ball radii.
        relus: bounds of ReLU layers `0 .. end - 1`.
        alphas: per ReLU layer a pair `(B, S, n_k)` of slopes used where the coefficient is
            `>= 0` and `< 0`, or None for CROWN's slopes.
        couple: False gives plain CROWN under L2 (no coupling term, `lam = 0`).
        close_early: also close the bound at each ReLU output by Cauchy-Schwarz around the
            centre (`p . a >= p . a(x0) - ||p|| R`) and keep the best closing.
        lam_state: per ReLU layer the multipliers of the previous call with the same shapes
            (read as a warm start, then overwritten); None searches from scratch.
    """
    batch, specs = rows.shape[:2]
    lam_a = rows.reshape(batch * specs, -1)
    best: torch.Tensor | None = None
    beta = torch.zeros(batch, specs, dtype=rows.dtype, device=rows.device)
    magnitude = torch.zeros_like(beta)
    for k in range(end, -1, -1):
        block = chain.blocks[k]
        lam_a, const = block.backward(lam_a.reshape((batch * specs, *block.out_shape)))
        const = const.reshape(batch, specs)
        beta = beta + const
        magnitude = magnitude + const.abs()
        if k == 0:
            break
        relu = relus[k - 1]
        p = lam_a.reshape(batch, specs, -1)
        if close_early:
            # Lipschitz closing at a_{k-1}: p . a >= p . a(x0) - ||p on live neurons|| R_{k-1}.
            early = beta + _lipschitz_closing(relu, p)
            best = early if best is None else torch.maximum(best, early)
        lo_alpha, up_alpha = alphas[k - 1] if alphas is not None else (None, None)
        g = p * relu_slopes(relu, p, lo_alpha, up_alpha)
        # Stable neurons add exactly 0 to the offset (slope 1 or 0, centre inside the box),
        # so only neurons unstable for some input of the batch enter it.
        idx = torch.nonzero(relu.unstable.any(0)).flatten()
        sub = relu.select(idx)
        p_u, g_u = p[..., idx], g[..., idx]
        if couple:
            init = lam_state.get(k) if lam_state is not None else None
            lam = best_multiplier(sub, p_u.detach(), g_u.detach(), init)
            if lam_state is not None:
                lam_state[k] = lam.detach()
        else:
            lam = torch.zeros(batch, specs, dtype=p.dtype, device=p.device)
        h = coupled_offset(sub, p_u, g_u, lam)
        beta = beta + h
        magnitude = magnitude + h.abs()
        lam_a = g.reshape(batch * specs, -1)
    coeff = lam_a.reshape(batch, specs, -1)
    centre = torch.einsum("bsn,bn->bs", coeff, x0.reshape(batch, -1).to(coeff.dtype))
    spread = rho.unsqueeze(1) * torch.linalg.vector_norm(coeff, dim=-1)
    bound = beta + centre - spread
    magnitude = magnitude + centre.abs() + spread
    if best is not None:
        bound = torch.maximum(bound, best)
    return Propagated(bound, magnitude)


def post_activation_radius(relu: ReluBounds) -> torch.Tensor:
    """`R >= ||relu(z(x)) - relu(c)||` over the ball `(B,)`: the smaller of `r` and `||D||`.

    ReLU is 1-Lipschitz per coordinate, so the change is at most `||z - c|| <= r`, and per
    coordinate at most `D_i = max(relu(u_i) - relu(c_i), relu(c_i) - relu(l_i))`.
    """
    c = relu.centre.clamp(min=0)
    change = torch.maximum(relu.upper.clamp(min=0) - c, c - relu.lower.clamp(min=0))
    return torch.minimum(relu.radius, torch.linalg.vector_norm(change.clamp(min=0), dim=1))


def _lipschitz_closing(relu: ReluBounds, p: torch.Tensor) -> torch.Tensor:
    """`min p . relu(z)` over the ball, bounded by Cauchy-Schwarz around the centre `(B, S)`.

    Coordinates dead on the whole ball (`u <= 0`) never change, so they leave the norm.
    """
    live = (relu.upper > 0).to(p).unsqueeze(1)
    centre = torch.einsum("bsn,bn->bs", p, relu.centre.clamp(min=0))
    spread = torch.linalg.vector_norm(p * live, dim=-1) * post_activation_radius(relu).unsqueeze(1)
    return centre - spread
