"""Pre-activation bounds of every ReLU layer over the input ball, layer by layer.

For ReLU layer `k` with pre-activation `z_k`, centre `c_k = z_k(x0)` (exact forward pass):

- interval `[l_k, u_k]`, per neuron the tighter of two sound intervals:
  * Lipschitz: `|z_ki(x) - c_ki| <= ||e_i^T T_k|| * R_{k-1}` where `R_{k-1}` bounds
    `||a_{k-1}(x) - a_{k-1}(x0)||` (for `k = 0`: `R = rho`, and the interval is exact);
  * propagation: `propagate` on the rows `+e_i` and `-e_i` with the bounds of layers `< k`
    (CROWN's slopes and the coupled offset), for the first `options.crown_layers` layers;
- ball radius `r_k >= ||z_k(x) - c_k||`: the smaller of `||T_k||_2 R_{k-1}` and the radius of
  the box around the centre, `||max(u_k - c_k, c_k - l_k)||`;
- post-activation radius `R_k = min(r_k, ||D_k||)` with `D_ki` the largest change of
  `relu(z_ki)` from `relu(c_ki)` over `[l_ki, u_ki]` (ReLU is 1-Lipschitz coordinatewise,
  so `||relu(z) - relu(c)|| <= ||z - c||`, and `|relu(z_i) - relu(c_i)| <= D_i`).

The intersection of two sound intervals is sound; the minimum of two sound radii is sound.
Every interval is widened by `INTERMEDIATE_SLACK` relative to the magnitudes it was computed
from, to cover float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipverify.bounds.chain import Chain
from lipverify.bounds.operator import BlockNorms
from lipverify.bounds.propagation import propagate
from lipverify.bounds.relaxation import ReluBounds

# Relative widening of every intermediate interval (float64 rounding allowance).
INTERMEDIATE_SLACK = 1e-9
# Objective rows (neurons x 2 signs x inputs) per backward pass.
DEFAULT_ROW_CHUNK = 2048


@dataclass(frozen=True)
class IntermediateOptions:
    """How intermediate bounds are computed.

    `crown_layers`: ReLU layers (after the first, whose interval is exact) whose bounds use
    backward propagation besides the Lipschitz interval (None: all). `couple`: use the
    coupling term in those passes. `row_chunk`: rows per backward pass (memory).
    """

    crown_layers: int | None = None
    couple: bool = True
    row_chunk: int = DEFAULT_ROW_CHUNK


def _propagated_interval(chain: Chain, k: int, x0: torch.Tensor, rho: torch.Tensor,
                         relus: list[ReluBounds], couple: bool,
                         chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds `(B, n_k)` of `z_k` by backward propagation."""
    batch = x0.shape[0]
    n = chain.blocks[k].out_size
    per = max(1, chunk // (2 * batch))
    lows, ups = [], []
    for start in range(0, n, per):
        stop = min(start + per, n)
        m = stop - start
        rows = torch.zeros(batch, 2 * m, n, dtype=torch.float64, device=x0.device)
        idx = torch.arange(m, device=x0.device)
        rows[:, idx, start + idx] = 1.0
        rows[:, m + idx, start + idx] = -1.0
        res = propagate(chain, k, rows, x0, rho, relus, None, couple)
        slack = INTERMEDIATE_SLACK * (1.0 + res.magnitude)
        lows.append(res.bound[:, :m] - slack[:, :m])
        ups.append(-(res.bound[:, m:] - slack[:, m:]))
    return torch.cat(lows, 1), torch.cat(ups, 1)


def _post_radius(bounds: ReluBounds) -> torch.Tensor:
    """`R >= ||relu(z) - relu(c)||` over the box and ball."""
    c = bounds.centre.clamp(min=0)
    change = torch.maximum(bounds.upper.clamp(min=0) - c, c - bounds.lower.clamp(min=0))
    return torch.minimum(bounds.radius, torch.linalg.vector_norm(change.clamp(min=0), dim=1))


@torch.no_grad()
def intermediate_bounds(chain: Chain, norms: BlockNorms, x0: torch.Tensor, rho: torch.Tensor,
                        options: IntermediateOptions | None = None) -> list[ReluBounds]:
    """`ReluBounds` of every ReLU layer for the balls `B(x0[b], rho[b])`."""
    options = options or IntermediateOptions()
    centres = chain.centres(x0)
    relus: list[ReluBounds] = []
    post = rho
    for k in range(chain.num_relus):
        c = centres[k]
        half = norms.row_norms[k].to(c).unsqueeze(0) * post.unsqueeze(1)
        half = half * (1 + INTERMEDIATE_SLACK) + INTERMEDIATE_SLACK * (1 + c.abs())
        lower, upper = c - half, c + half
        use_prop = k > 0 and (options.crown_layers is None or k <= options.crown_layers)
        if use_prop:
            p_lo, p_up = _propagated_interval(chain, k, x0, rho, relus, options.couple,
                                              options.row_chunk)
            lower, upper = torch.maximum(lower, p_lo), torch.minimum(upper, p_up)
        box = torch.linalg.vector_norm(torch.maximum(upper - c, c - lower).clamp(min=0), dim=1)
        radius = torch.minimum(norms.op_norms[k] * post, box) * (1 + INTERMEDIATE_SLACK)
        bounds = ReluBounds(lower, upper, c, radius)
        relus.append(bounds)
        post = _post_radius(bounds)
    return relus
