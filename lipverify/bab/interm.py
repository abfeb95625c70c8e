"""Per sub-domain pre-activation bounds, tightened by the domain's own splits.

A split `z_j >= 0` (or `<= 0`) makes neuron `j` stable on its sub-domain, so the bounds of every
later ReLU's input, recomputed by `backward_bound` over the sub-domain's clamped bounds, are
often far tighter than the root's: on mnist_fc 256x4 `prop_3_0.05` the domains left open after
20 s prove 52 of 64 instead of 24 with them. Only the neurons unstable at the root carry
bounds of their own (`Interm.index`); the rest keep the root's, which are already stable.

Bounds recomputed with `magnitudes` are lowered by their proven rounding allowance at the
arithmetic's unit roundoff `unit`, and are sound wherever that arithmetic has IEEE rounding with
componentwise error bounds (float64; float32 dense layers on the CPU); without, a guide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lipverify.bab.relaxed import InputSet, backward_bound, rounding_factor, split_bounds
from lipverify.bounds.chain import Chain
from lipverify.types import deadline_passed

Bounds = list[tuple[torch.Tensor, torch.Tensor]]
CHUNK = 128  # sub-domains per backward pass (memory: CHUNK x 2U x n floats per layer)


@dataclass(frozen=True, eq=False)
class Interm:
    """The root's bounds `(1, n_k)` per ReLU, the indices of its unstable neurons, and the
    root's slopes for their rows (`slopes[k][j]` `(2 U_k, n_j)`, `+e` rows then `-e`), reused
    on every sub-domain: any slope in `[0, 1]` is sound, and these were optimised."""

    root: Bounds
    index: list[torch.Tensor]
    slopes: list[list[torch.Tensor]]

    @classmethod
    def of(cls, root: Bounds, slopes: list[list[torch.Tensor]]) -> Interm:
        """From the root's bounds and its slopes for every row (`Root.slopes`)."""
        index = [torch.nonzero((lo[0] < 0) & (up[0] > 0)).flatten() for lo, up in root]
        kept = [[a[torch.cat([i, i + len(lo[0])])] for a in layer]
                for layer, i, (lo, _) in zip(slopes, index, root, strict=True)]
        return cls(root, index, kept)

    def start(self, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The root's bounds of the unstable neurons, `(count, U_k)` per ReLU."""
        lower = [lo[0, i].expand(count, -1).clone() for (lo, _), i in zip(self.root, self.index)]
        upper = [up[0, i].expand(count, -1).clone() for (_, up), i in zip(self.root, self.index)]
        return lower, upper

    def full(self, lower: list[torch.Tensor], upper: list[torch.Tensor],
             upto: int | None = None) -> Bounds:
        """Bounds `(B, n_k)` of the first `upto` ReLUs from the compact ones."""
        out = []
        for k in range(len(self.root) if upto is None else upto):
            (lo, up), i = self.root[k], self.index[k]
            count = len(lower[k])
            lo_b, up_b = lo.expand(count, -1).clone(), up.expand(count, -1).clone()
            lo_b[:, i], up_b[:, i] = lower[k], upper[k]
            out.append((lo_b, up_b))
        return out


def refine(chain: Chain, inputs: InputSet, interm: Interm, lower: list[torch.Tensor],
           upper: list[torch.Tensor], splits: list[torch.Tensor],
           first: torch.Tensor | int = 0, magnitudes: Chain | None = None,
           unit: float = 2.0**-53, deadline: float | None = None) -> None:
    """Tighten `lower`/`upper` (in place) on each sub-domain of the ReLUs after its `first`
    (per domain, or one for all): the shallowest ReLU whose splits are new since its bounds
    were last refined. Each neuron still unstable on the domain is bounded by the rows `+-e_j`
    over the earlier ReLUs' clamped bounds, at the root's slopes. With `magnitudes`
    (`abs_chain(chain)`) every new bound is lowered by its rounding allowance at unit
    roundoff `unit`. Past `deadline` the rest keep the bounds they have (sound, looser)."""
    factor = rounding_factor(chain, unit) if magnitudes is not None else 0.0
    count = len(splits[0]) if splits else 0
    if not count:
        return
    device = lower[0].device
    first = torch.as_tensor(first, device=device).expand(count)
    for k in range(1, len(interm.root)):
        units = len(interm.index[k])
        if not units:
            continue
        live = (lower[k] < 0) & (upper[k] > 0) & (splits[k][:, interm.index[k]] == 0)
        todo = torch.nonzero((first < k) & live.any(dim=1)).flatten()
        for at in range(0, len(todo), CHUNK):
            if deadline_passed(deadline):
                return
            part = todo[at:at + CHUNK]
            cols = torch.nonzero(live[part].any(dim=0)).flatten()  # rows any domain here needs
            value = _rows(chain, inputs, interm, lower, upper, splits, k, part, cols,
                          magnitudes, factor)
            at_ = (part[:, None], cols[None])
            lower[k][at_] = torch.maximum(lower[k][at_], value[:, :len(cols)])
            upper[k][at_] = torch.minimum(upper[k][at_], -value[:, len(cols):])


def _rows(chain: Chain, inputs: InputSet, interm: Interm, lower: list[torch.Tensor],
          upper: list[torch.Tensor], splits: list[torch.Tensor], k: int, part: torch.Tensor,
          cols: torch.Tensor, magnitudes: Chain | None, factor: float) -> torch.Tensor:
    """Lower bounds `(len(part), 2 len(cols))` of `+z_j` then `-z_j` for ReLU `k`'s unstable
    neurons `cols` (positions in `interm.index[k]`) on domains `part`, less the allowance."""
    size, dtype, device = len(part), lower[k].dtype, lower[k].device
    eye = torch.eye(chain.blocks[k].out_size, dtype=dtype, device=device)[interm.index[k][cols]]
    rows = torch.cat([eye, -eye])[None].expand(size, -1, -1)
    earlier = split_bounds(
        interm.full([lo[part] for lo in lower[:k]], [up[part] for up in upper[:k]], k),
        [s[part] for s in splits[:k]])
    both = torch.cat([cols, cols + len(interm.index[k])])
    alpha = [a[both].to(dtype)[None].expand(size, -1, -1) for a in interm.slopes[k]]
    with torch.no_grad():
        value, _, mag = backward_bound(chain, earlier, None, alpha, None, rows,
                                       torch.zeros(size, 2 * len(cols), dtype=dtype,
                                                   device=device), inputs, k, magnitudes)
    return value - factor * mag
