"""Pre-activation bounds of every ReLU layer over the input ball, layer by layer.

For ReLU layer `k` with pre-activation `z_k`, centre `c_k = z_k(x0)` (exact forward pass):

- interval `[l_k, u_k]`, per neuron the tighter of two sound intervals:
  * Lipschitz: `|z_ki(x) - c_ki| <= ||e_i^T T_k|| * R_{k-1}` where `R_{k-1}` bounds
    `||a_{k-1}(x) - a_{k-1}(x0)||` (for `k = 0`: `R = rho`, and the interval is exact);
  * propagation: `propagate` on the rows `+e_i` and `-e_i` with the bounds of layers `< k`
    (CROWN's slopes and the coupled offset), for the first `options.crown_layers` layers and
    only for neurons whose Lipschitz interval contains 0 (for some input of the batch);
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
# Largest (rows x earlier unstable neurons) per input for which a layer's intermediate bounds
# are propagated; above it the Lipschitz interval alone is used (measured: on conv layers of
# thousands of neurons propagation costs ~100x more and changes final margins by < 1%).
DEFAULT_PROPAGATION_BUDGET = 4_000_000


@dataclass(frozen=True)
class IntermediateOptions:
    """How intermediate bounds are computed.

    `crown_layers`: ReLU layers (after the first, whose interval is exact) whose bounds may use
    backward propagation besides the Lipschitz interval (None: all). `budget`: a layer is
    propagated only when `2 * candidate neurons * earlier unstable neurons` is at most this
    (None: always). `couple`: use the coupling term in those passes. `row_chunk`: rows per
    backward pass (memory).
    """

    crown_layers: int | None = None
    budget: int | None = DEFAULT_PROPAGATION_BUDGET
    couple: bool = True
    row_chunk: int = DEFAULT_ROW_CHUNK


def _propagated_interval(chain: Chain, k: int, x0: torch.Tensor, rho: torch.Tensor,
                         relus: list[ReluBounds], couple: bool, chunk: int,
                         neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds `(B, m)` of `z_k[neurons]` by backward propagation."""
    batch = x0.shape[0]
    n = chain.blocks[k].out_size
    per = max(1, chunk // (2 * batch))
    lows, ups = [], []
    for start in range(0, len(neurons), per):
        sel = neurons[start:start + per]
        m = len(sel)
        rows = torch.zeros(batch, 2 * m, n, dtype=torch.float64, device=x0.device)
        idx = torch.arange(m, device=x0.device)
        rows[:, idx, sel] = 1.0
        rows[:, m + idx, sel] = -1.0
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
            # Neurons the Lipschitz interval already fixes the sign of keep that interval.
            neurons = torch.nonzero(((lower < 0) & (upper > 0)).any(0)).flatten()
            earlier = sum(int(r.unstable.any(0).sum()) for r in relus)
            affordable = options.budget is None or 2 * len(neurons) * earlier <= options.budget
            if len(neurons) and affordable:
                p_lo, p_up = _propagated_interval(chain, k, x0, rho, relus, options.couple,
                                                  options.row_chunk, neurons)
                lower[:, neurons] = torch.maximum(lower[:, neurons], p_lo)
                upper[:, neurons] = torch.minimum(upper[:, neurons], p_up)
        box = torch.linalg.vector_norm(torch.maximum(upper - c, c - lower).clamp(min=0), dim=1)
        radius = torch.minimum(norms.op_norms[k] * post, box) * (1 + INTERMEDIATE_SLACK)
        bounds = ReluBounds(lower, upper, c, radius)
        relus.append(bounds)
        post = _post_radius(bounds)
    return relus
