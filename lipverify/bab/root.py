"""Pre-activation bounds of every ReLU over the whole region, optimised as alpha-CROWN does.

Layer by layer, the bounds of ReLU `k`'s input are the rows `+e_j` and `-e_j` of block `k`'s
output bounded by `backward_bound` over the earlier ReLUs' bounds: CROWN's slopes first, then
each row's own slopes optimised (in float32, for speed). The answer is re-evaluated in float64
at the best slopes and lowered by its proven rounding allowance (`backward_bound`), so it is
sound whatever the float32 optimiser did; the tighter of the CROWN and optimised bounds is
kept per neuron.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipverify.bab.optimise import Steps, optimise
from lipverify.bab.relaxed import (
    InputSet,
    abs_chain,
    backward_bound,
    cast_chain,
    initial_slopes,
    outward,
    rounding_factor,
)
from lipverify.bounds.chain import Chain
from lipverify.types import deadline_passed

Bounds = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class Root:
    """Sound float64 bounds `(n_k,)` per ReLU, and per ReLU `k` the slopes that gave them:
    `slopes[k][j]` `(2 n_k, n_j)` on ReLU `j < k` for the rows `+e_i` then `-e_i` (`dtype`)."""

    bounds: Bounds
    slopes: list[list[torch.Tensor]]


def root_bounds(chain: Chain, inputs: InputSet, steps: Steps, dtype: torch.dtype = torch.float32,
                deadline: float | None = None, magnitudes: Chain | None = None) -> Bounds:
    """Sound float64 bounds `(n_k,)` of every ReLU's input over `inputs` (float64 chain;
    `magnitudes` is its `abs_chain`, built here when not given)."""
    return root_relaxation(chain, inputs, steps, dtype, deadline, magnitudes).bounds


def root_relaxation(chain: Chain, inputs: InputSet, steps: Steps,
                    dtype: torch.dtype = torch.float32, deadline: float | None = None,
                    magnitudes: Chain | None = None, given: Root | None = None) -> Root:
    """`root_bounds` with the slopes behind them (for sub-domains' own bounds). `given`: sound
    bounds (and slopes) of the first ReLUs, kept as they are; the later ones are computed
    over them."""
    fast_chain = cast_chain(chain, dtype, inputs.centre.device)
    magnitudes = abs_chain(chain) if magnitudes is None else magnitudes
    fast_inputs = inputs.to(dtype, inputs.centre.device)
    bounds: Bounds = list(given.bounds) if given is not None else []
    slopes: list[list[torch.Tensor]] = list(given.slopes) if given is not None else []
    for k in range(len(bounds), chain.num_relus):
        n = chain.blocks[k].out_size
        eye = torch.eye(n, dtype=torch.float64, device=inputs.centre.device)
        c = torch.cat([eye, -eye])[None].reshape(1, 2 * n, *chain.blocks[k].out_shape)
        c = c.reshape(1, 2 * n, -1)
        d = torch.zeros(1, 2 * n, dtype=torch.float64, device=inputs.centre.device)
        crown_alpha = initial_slopes([(lo[None], up[None]) for lo, up in bounds], 2 * n)
        lower = _sound(chain, magnitudes, bounds, crown_alpha, c, d, inputs, k)
        used = [a[0].to(dtype) for a in crown_alpha]
        if k > 0 and steps.iterations > 0 and not deadline_passed(deadline):
            fast = [(lo[None], up[None]) for lo, up in outward(bounds, dtype)]

            def bound(alpha, beta, fast=fast, c=c.to(dtype), d=d.to(dtype), k=k):
                return backward_bound(fast_chain, fast, None, alpha, None, c, d, fast_inputs, k)

            best = optimise(bound, [a.to(dtype) for a in crown_alpha], None, steps)
            tuned = _sound(chain, magnitudes, bounds, [a.double() for a in best.alpha], c, d,
                           inputs, k)
            better = tuned > lower
            used = [torch.where(better[:, None], a[0], u) for a, u in zip(best.alpha, used)]
            lower = torch.maximum(lower, tuned)
        bounds.append((lower[:n], -lower[n:]))
        slopes.append(used)
    return Root(bounds, slopes)


def _sound(chain: Chain, magnitudes: Chain, bounds: Bounds, alpha: list[torch.Tensor],
           c: torch.Tensor, d: torch.Tensor, inputs: InputSet, k: int) -> torch.Tensor:
    """Float64 lower bounds `(2n,)` of the rows, less their rounding allowance."""
    with torch.no_grad():
        value, _, size = backward_bound(chain, [(lo[None], up[None]) for lo, up in bounds],
                                        None, alpha, None, c, d, inputs, k, magnitudes)
    return (value - rounding_factor(chain) * size)[0]
