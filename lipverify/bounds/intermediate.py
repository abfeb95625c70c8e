"""Pre-activation bounds of every ReLU layer over the input ball, layer by layer.

For ReLU layer `k` with pre-activation `z_k`, centre `c_k = z_k(x0)` (exact forward pass):

- interval `[l_k, u_k]`, per neuron the tighter of two sound intervals:
  * Lipschitz: `|z_ki(x) - c_ki| <= ||e_i^T T_k|| * R_{k-1}` where `R_{k-1}` bounds
    `||a_{k-1}(x) - a_{k-1}(x0)||` (for `k = 0`: `R = rho`, and the interval is exact);
  * propagation: `propagate` on the rows `+e_i` and `-e_i` with the bounds of layers `< k`
    (CROWN's slopes and the coupled offset), for the first `options.crown_layers` layers and
    only for neurons whose Lipschitz interval contains 0 (for some input of the batch);
- ball radius `r_k >= ||z_k(x) - c_k||`: the smaller of `||T_k||_2 R_{k-1}` and the radius of
  the box around the centre, `||max(u_k - c_k, c_k - l_k)||`; for Dense blocks, the row and
  operator norms are those of `W` without the columns of neurons dead on the whole ball;
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
from lipverify.bounds.operator import NORM_REL_SLACK, BlockNorms
from lipverify.network.layers import Dense
from lipverify.bounds.optimise import SlopeOptions, optimised_bound
from lipverify.bounds.propagation import post_activation_radius, propagate
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
    (None: always). `couple`: use the coupling term in those passes. `iterations`: slope
    optimisation steps for those rows (0: CROWN's slopes). `row_chunk`: rows per backward pass
    (memory).
    """

    crown_layers: int | None = None
    budget: int | None = DEFAULT_PROPAGATION_BUDGET
    couple: bool = True
    iterations: int = 0
    row_chunk: int = DEFAULT_ROW_CHUNK


def _propagated_interval(chain: Chain, k: int, x0: torch.Tensor, rho: torch.Tensor,
                         relus: list[ReluBounds], couple: bool, chunk: int,
                         neurons: torch.Tensor,
                         iterations: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
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
        if iterations > 0:
            with torch.enable_grad():
                res = optimised_bound(chain, rows, x0, rho, relus,
                                      SlopeOptions(iterations=iterations, couple=couple), end=k)
        else:
            res = propagate(chain, k, rows, x0, rho, relus, None, couple)
        slack = INTERMEDIATE_SLACK * (1.0 + res.magnitude)
        lows.append(res.bound[:, :m] - slack[:, :m])
        ups.append(-(res.bound[:, m:] - slack[:, m:]))
    return torch.cat(lows, 1), torch.cat(ups, 1)


def _masked_norms(chain: Chain, norms: BlockNorms, k: int,
                  prev: ReluBounds | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms `(B or 1, n_k)` and operator norms `(B or 1,)` of block `k`'s linear part.

    For a block whose only weighted layer is Dense, the columns of neurons of the previous
    ReLU layer that are dead on the whole ball (`u <= 0`) are dropped per input: those
    coordinates of `a_{k-1}(x) - a_{k-1}(x0)` are 0, so `z_k(x) - c_k = W P (a - a0)` with `P`
    the mask, and the norms of `W P` bound the change. Operator norms come from the largest
    eigenvalue of `W P W^T` (exact up to rounding, inflated by `NORM_REL_SLACK`).
    """
    block = chain.blocks[k]
    rows = norms.row_norms[k].unsqueeze(0)
    ops = torch.tensor([norms.op_norms[k]], dtype=torch.float64)
    affine = block.affine_layers()
    if prev is None or len(affine) != 1 or not isinstance(affine[0], Dense):
        return rows, ops
    weight = affine[0].weight.to(prev.upper)
    if weight.shape[1] != prev.upper.shape[1]:
        return rows, ops
    masked = weight.unsqueeze(0) * (prev.upper > 0).to(weight).unsqueeze(1)
    m_rows = torch.linalg.vector_norm(masked, dim=2) * (1 + NORM_REL_SLACK)
    small = masked if masked.shape[1] <= masked.shape[2] else masked.transpose(1, 2)
    gram = small @ small.transpose(1, 2)
    top = torch.linalg.eigvalsh(gram)[:, -1].clamp(min=0)
    m_ops = torch.sqrt(top) * (1 + NORM_REL_SLACK)
    return torch.minimum(m_rows, rows.to(m_rows)), torch.minimum(m_ops, ops.to(m_ops))


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
        rows_k, op_k = _masked_norms(chain, norms, k, relus[-1] if relus else None)
        half = rows_k.to(c) * post.unsqueeze(1)
        half = half * (1 + INTERMEDIATE_SLACK) + INTERMEDIATE_SLACK * (1 + c.abs())
        lower, upper = c - half, c + half
        use_prop = k > 0 and (options.crown_layers is None or k <= options.crown_layers)
        if use_prop:
            # Neurons the Lipschitz interval already fixes the sign of keep that interval. The
            # budget is judged per input, so an input's bounds do not depend on its batch.
            unstable = (lower < 0) & (upper > 0)
            chosen = unstable.any(1)
            if options.budget is not None:
                earlier = sum(r.unstable.sum(1) for r in relus)
                chosen &= 2 * unstable.sum(1) * earlier <= options.budget
            picked = torch.nonzero(chosen).flatten()
            neurons = torch.nonzero(unstable[picked].any(0)).flatten()
            if len(picked) and len(neurons):
                p_lo, p_up = _propagated_interval(chain, k, x0[picked], rho[picked],
                                                  [r.of_inputs(picked) for r in relus],
                                                  options.couple, options.row_chunk, neurons,
                                                  options.iterations)
                at = (picked.unsqueeze(1), neurons.unsqueeze(0))
                # Only the input's own unstable neurons take the propagated interval (the others
                # are in the union for its batch-mates).
                own = unstable[at]
                lower[at] = torch.where(own, torch.maximum(lower[at], p_lo), lower[at])
                upper[at] = torch.where(own, torch.minimum(upper[at], p_up), upper[at])
        box = torch.linalg.vector_norm(torch.maximum(upper - c, c - lower).clamp(min=0), dim=1)
        radius = torch.minimum(op_k.to(c) * post, box) * (1 + INTERMEDIATE_SLACK)
        bounds = ReluBounds(lower, upper, c, radius)
        relus.append(bounds)
        post = post_activation_radius(bounds)
    return relus
