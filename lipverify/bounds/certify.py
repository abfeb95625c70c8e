"""From properties to objective rows, and from row bounds to a safe property margin.

A property is violated when some term `C y <= d` holds (all rows of the term). It is safe on the
ball when every term has a row with `min_x c . f(x) - d > 0`. The margin lower bound is therefore
`min_terms max_rows (lb(c . f) - d - allowance)`, with the allowance covering:

- float64 rounding of the propagation: `ROUNDING_REL * (1 + |lb| + magnitude)`, `magnitude` the
  sum of absolute values of the terms the bound added up (`Propagated.magnitude`);
- a further margin of safety of `sum_j |c_j|` times `lipverify.margins.forward_error` of the
  outputs at the centre (the certificate is about the exact function of the layer view's weights,
  which the float64 propagation approximates to far better than this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lipverify.bounds.chain import Chain
from lipverify.bounds.intermediate import IntermediateOptions, intermediate_bounds
from lipverify.bounds.operator import BlockNorms
from lipverify.bounds.optimise import SlopeOptions, optimised_bound
from lipverify.bounds.propagation import Propagated
from lipverify.margins import forward_error
from lipverify.types import Property

# Relative allowance for float64 rounding in a propagated bound.
ROUNDING_REL = 1e-9


@dataclass(frozen=True)
class RowSet:
    """All property rows of a batch, padded: `rows` `(B, S, K)`, `rhs` `(B, S)`, `term` `(B, S)`.

    `term[b, s]` is the term index of row `s` of input `b`, -1 for padding.
    """

    rows: np.ndarray
    rhs: np.ndarray
    term: np.ndarray

    @classmethod
    def from_properties(cls, props: Sequence[Property]) -> RowSet:
        """Stack the rows of each property's terms."""
        per = [sum(len(c) for c, _ in p.terms) for p in props]
        width = max(per) if per else 0
        k = props[0].num_outputs if props else 0
        rows = np.zeros((len(props), max(width, 1), k))
        rhs = np.zeros((len(props), max(width, 1)))
        term = np.full((len(props), max(width, 1)), -1)
        for b, prop in enumerate(props):
            s = 0
            for t, (c, d) in enumerate(prop.terms):
                rows[b, s:s + len(c)] = c
                rhs[b, s:s + len(c)] = d
                term[b, s:s + len(c)] = t
                s += len(c)
        return cls(rows, rhs, term)


def lower_bounds(chain: Chain, norms: BlockNorms, x0: torch.Tensor, rho: torch.Tensor,
                 rowset: RowSet, inter: IntermediateOptions, opts: object,
                 deadline: float | None = None) -> Propagated:
    """Lower bounds of `rows . f(x)` over the balls (intermediate bounds, then slopes).

    Past `deadline` (`time.monotonic()`) the slope optimisation stops with the best so far.
    """
    relus = intermediate_bounds(chain, norms, x0, rho, inter)
    rows = torch.as_tensor(rowset.rows, dtype=torch.float64, device=x0.device)
    slope_opts = SlopeOptions(iterations=opts.iterations, lr=opts.lr, lr_decay=opts.lr_decay,
                              deadline=deadline)
    target = torch.as_tensor(rowset.rhs, dtype=torch.float64, device=x0.device)
    return optimised_bound(chain, rows, x0, rho, relus, slope_opts, target)


def margin_lower(rowset: RowSet, res: Propagated, outputs: np.ndarray) -> np.ndarray:
    """Sound lower bound of each input's property margin, allowances subtracted."""
    bound = res.bound.detach().cpu().numpy()
    magnitude = res.magnitude.detach().cpu().numpy()
    allowance = ROUNDING_REL * (1.0 + np.abs(bound) + magnitude)
    allowance = allowance + np.abs(rowset.rows).sum(-1) * forward_error(outputs)[:, None]
    slack = bound - rowset.rhs - allowance
    out = np.empty(len(bound))
    for b in range(len(bound)):
        terms = [t for t in np.unique(rowset.term[b]) if t >= 0]
        if not terms:
            out[b] = np.inf
            continue
        out[b] = min(float(np.max(slack[b][rowset.term[b] == t])) for t in terms)
    return out
