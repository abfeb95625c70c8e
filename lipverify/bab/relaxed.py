"""Lower bounds of objective rows on a batch of ReLU sub-domains (alpha/beta-CROWN style).

A sub-domain is the input region cut by split constraints `s_j z_j >= 0` (`s_j = +1`: the neuron
is active, `-1`: inactive). For every feasible `x`, with pre-activation bounds `l <= z <= u` that
hold on the sub-domain, each ReLU is bounded below by `alpha z` (any `alpha` in `[0, 1]`) and
above by `u (z - l) / (u - l)` when unstable, and equals `z` or `0` when stable. The split
constraints enter by weak duality with multipliers `beta >= 0`: `f(x) >= f(x) - beta s z(x)` on
the sub-domain. Propagating the rows backwards through these inequalities gives a linear
function of `x` below the rows on the sub-domain; its minimum over the region (a box or an L2
ball, in closed form) is a sound lower bound for every `alpha` in `[0, 1]` and `beta >= 0`, so
optimising them only changes tightness (they are clamped before use).

Pre-activation bounds here are the root's, with split neurons clamped at 0: valid on every
sub-domain since a sub-domain is a subset of the root region.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lipverify.bounds.chain import Block, Chain


@dataclass(frozen=True, eq=False)
class InputSet:
    """The region inputs range over: a box `[lower, upper]` or an L2 ball `(centre, radius)`,
    flattened (`(n,)` tensors)."""

    centre: torch.Tensor
    half: torch.Tensor | None  # box half-widths; None for an L2 ball
    radius: float = 0.0

    @classmethod
    def box(cls, lower: torch.Tensor, upper: torch.Tensor) -> InputSet:
        return cls((lower + upper) / 2, (upper - lower) / 2)

    @classmethod
    def ball(cls, centre: torch.Tensor, radius: float) -> InputSet:
        return cls(centre, None, float(radius))

    def to(self, dtype: torch.dtype, device: torch.device | str) -> InputSet:
        """The same set in another dtype: the box is widened to contain the original."""
        if self.half is None:
            return InputSet(self.centre.to(device, dtype), None, self.radius)
        lower = _down(self.centre - self.half, dtype).to(device)
        upper = _up(self.centre + self.half, dtype).to(device)
        return InputSet.box(lower, upper)

    def minimum(self, a: torch.Tensor) -> torch.Tensor:
        """`min a . x` over the set, per row of `a` `(N, n)`."""
        if self.half is None:
            return a @ self.centre - self.radius * a.norm(dim=1)
        return a @ self.centre - a.abs() @ self.half

    def minimiser(self, a: torch.Tensor) -> torch.Tensor:
        """A point attaining `minimum` per row of `a` `(N, n)`."""
        if self.half is None:
            norm = a.norm(dim=1, keepdim=True).clamp_min(1e-30)
            return self.centre - self.radius * a / norm
        return self.centre - torch.sign(a) * self.half

    @property
    def scale(self) -> float:
        """The largest |x| over the set (for rounding allowances)."""
        extent = self.half if self.half is not None else self.radius
        return float((self.centre.abs() + extent).max())


def _down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, rounded towards -inf."""
    y = x.to(dtype)
    return torch.where(y.to(x.dtype) > x, torch.nextafter(y, torch.full_like(y, -math.inf)), y)


def _up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, rounded towards +inf."""
    y = x.to(dtype)
    return torch.where(y.to(x.dtype) < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


def outward(bounds: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds in `dtype`, each interval widened to contain the original."""
    return [(_down(lo, dtype), _up(up, dtype)) for lo, up in bounds]


def map_tensors(chain: Chain, fn: Callable[[torch.Tensor], torch.Tensor]) -> Chain:
    """The chain with `fn` applied to every tensor of every layer (weights, biases, shifts)."""
    def apply(layer):
        changes = {f.name: fn(getattr(layer, f.name)) for f in dataclasses.fields(layer)
                   if isinstance(getattr(layer, f.name), torch.Tensor)}
        return dataclasses.replace(layer, **changes)

    blocks = tuple(dataclasses.replace(b, layers=tuple(apply(la) for la in b.layers))
                   for b in chain.blocks)
    return Chain(blocks, chain.input_shape)


def cast_chain(chain: Chain, dtype: torch.dtype, device: torch.device | str) -> Chain:
    """The chain with every weight in `dtype` on `device` (the maps are the same up to the
    rounding of the weights; bounds that must be sound are computed on the float64 chain)."""
    return map_tensors(chain, lambda t: t.to(device, dtype))


def split_bounds(root: list[tuple[torch.Tensor, torch.Tensor]], splits: list[torch.Tensor]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per ReLU the bounds `(B, n)` of the sub-domains: the root's `(n,)` with active splits'
    lower and inactive splits' upper bounds clamped at 0."""
    out = []
    for (lo, up), s in zip(root, splits, strict=True):
        lo_b = torch.where(s > 0, lo.clamp_min(0), lo)
        up_b = torch.where(s < 0, up.clamp_max(0), up)
        out.append((lo_b, up_b))
    return out


def initial_slopes(bounds: list[tuple[torch.Tensor, torch.Tensor]], rows: int
                   ) -> list[torch.Tensor]:
    """CROWN's adaptive lower slopes, `(B, rows, n)`: 1 where `u > -l`, else 0."""
    return [(up > -lo).to(lo.dtype)[:, None, :].expand(-1, rows, -1).clone()
            for lo, up in bounds]


def abs_chain(chain: Chain) -> Chain:
    """The chain with every weight, bias and shift replaced by its absolute value: its
    `backward` of `|lam|` gives `(|lam| |W|, |lam| . |b|)`, the magnitudes rounding scales with."""
    return map_tensors(chain, torch.abs)


def rounding_factor(chain: Chain, unit: float = 2.0**-53) -> float:
    """Relative allowance for float64 rounding of `backward_bound` given its magnitude `size`:
    Higham's `gamma` for the longest sum (a block's inputs plus outputs, plus a margin for the
    elementwise steps), doubled to cover the magnitude's own rounding and weight folding.
    `unit` is the unit roundoff of the arithmetic (float64 by default)."""
    longest = max(b.in_size + b.out_size for b in chain.blocks) + 64
    return 2.0 * longest * unit / (1.0 - longest * unit)


def backward_bound(chain: Chain, bounds: list[tuple[torch.Tensor, torch.Tensor]],
                   splits: list[torch.Tensor] | None, alpha: list[torch.Tensor],
                   beta: list[torch.Tensor] | None, c: torch.Tensor, d: torch.Tensor,
                   inputs: InputSet, upto: int | None = None, magnitudes: Chain | None = None,
                   tau: list[torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Lower bounds `(B, R)` of `c . z_upto(x) - d` on each sub-domain.

    Args:
        chain: The network; `z_upto` is block `upto`'s output (default: the logits).
        bounds: Per ReLU before block `upto`, sub-domain bounds `(B, n)` (or `(1, n)`).
        splits: Per ReLU the split signs `(B, n)` (+1, -1, 0), or None (no splits).
        alpha: Per ReLU slopes `(B, R, n)`, clamped to `[0, 1]` here: an unstable neuron's
            lower line `alpha z`; on an active one (`l >= 0`), `alpha z + (1 - alpha) l`
            below it (coefficient `>= 0`) or `alpha z + (1 - alpha) u` above it (`< 0`). At
            1 that is `z` itself; below 1 it uses the neuron's own bounds, which can be far
            tighter than what backward propagation through the earlier layers gives (bounds
            proven by tightening, or clamped by a split).
        beta: Per ReLU split multipliers `(B, R, n)`, clamped at 0 here, or None.
        c, d: Rows `(B, R, m)` on `z_upto` and offsets `(B, R)`.
        inputs: The region.
        magnitudes: `abs_chain(chain)`, to also return the magnitude of the computation.
        tau: Per ReLU `(B, R, n)` in `[0, 1]` (clamped here), with `bounds` the root's
            (not clamped by the splits). A split neuron keeps its root relaxation, and its
            upper line becomes `(1 - tau) u (z - l) / (u - l) + tau z` (active) or
            `(1 - tau) u (z - l) / (u - l)` (inactive): each a convex combination of two
            lines above the ReLU on the sub-domain. Its lower line stays `alpha z`, below the
            ReLU everywhere. At `tau = 0`, a child's bound equals its parent's with the same
            parameters, so a split never loosens a bound.

    Returns:
        The bounds, per ReLU the rows' coefficients `(B, R, n)` on its output (for branching),
        and (with `magnitudes`, else zeros) a magnitude `(B, R)` such that the float64 bound's
        rounding error is at most `rounding_factor(chain)` times it. Each step's rounding is
        charged where it happens: a computed coefficient `a = fl(lam W)` differs from `lam W`
        by at most `gamma |lam| |W|`, which can move `a . v` by that times `|v|`'s bound (the
        pre-activation bounds, or the input set); the relaxation's products are charged
        `(|a| + beta) (|l| + |u|)`; the bias terms `|lam| |b|`.
    """
    end = chain.num_relus if upto is None else upto
    batch, rows = c.shape[:2]
    lam = c.reshape(batch * rows, *chain.blocks[end].out_shape)
    const = -d.reshape(-1)
    size = d.abs().reshape(-1) if magnitudes is not None else torch.zeros_like(const)
    coefs: list[torch.Tensor] = [None] * end  # type: ignore[list-item]
    for k in reversed(range(end)):
        a, cst = chain.blocks[k + 1].backward(lam)
        const = const + cst
        a = a.reshape(batch, rows, -1)
        coefs[k] = a
        lo, up = bounds[k]
        lo, up = lo[:, None, :], up[:, None, :]
        if magnitudes is not None:
            size = size + _charge(magnitudes.blocks[k + 1], lam, torch.maximum(lo.abs(), up.abs()),
                                  batch, rows)
        active, dead = lo >= 0, up <= 0
        unstable = ~(active | dead)
        width = torch.where(unstable, up - lo, torch.ones_like(up))
        upper_slope = torch.where(unstable, up / width, torch.zeros_like(up))
        intercept = torch.where(unstable, -upper_slope * lo, torch.zeros_like(lo))
        if tau is not None and splits is not None:
            t = tau[k].clamp(0, 1) * (splits[k] != 0)[:, None, :].to(up.dtype)
            intercept = intercept * (1 - t)
            upper_slope = upper_slope * (1 - t) + t * (splits[k] > 0)[:, None, :].to(up.dtype)
        # lower lines (for a >= 0) and upper lines (a < 0): `slope z` below an unstable
        # neuron; `slope z + (1 - slope) l` below and `... u` above an active one; 0 if dead
        slope = alpha[k].clamp(0, 1)
        lower_slope = torch.where(dead, torch.zeros_like(slope), slope)
        upper_slope = torch.where(active, slope, upper_slope)
        lower_intercept = torch.where(active, (1 - slope) * lo, torch.zeros_like(slope))
        intercept = torch.where(active, (1 - slope) * up, intercept)
        neg, pos = a.clamp(max=0), a.clamp(min=0)
        g = pos * lower_slope + neg * upper_slope
        const = const + (neg * intercept + pos * lower_intercept).sum(dim=2).reshape(-1)
        weight = a.abs()
        if beta is not None and splits is not None:
            b_k = beta[k].clamp_min(0)
            g = g - b_k * splits[k][:, None, :].to(g.dtype)
            weight = weight + b_k
        if magnitudes is not None:
            size = size + (weight * (lo.abs() + up.abs())).sum(dim=2).reshape(-1)
        lam = g.reshape(batch * rows, *chain.blocks[k].out_shape)
    a, cst = chain.blocks[0].backward(lam)
    a = a.reshape(batch * rows, -1)
    const = const + cst
    value = const + inputs.minimum(a)
    if magnitudes is not None:
        extent = inputs.centre.abs() + (inputs.half if inputs.half is not None
                                        else inputs.radius)
        size = size + _charge(magnitudes.blocks[0], lam, extent[None, None], batch, rows) \
            + a.abs() @ extent
    return value.reshape(batch, rows), coefs, size.reshape(batch, rows)


def _charge(block: Block, lam: torch.Tensor, reach: torch.Tensor, batch: int, rows: int
            ) -> torch.Tensor:
    """`|lam| |T| reach + |lam| . |T|(0)` per row: the magnitude of a block's backward step,
    with `block` an `abs_chain` block and `reach` `(B or 1, 1, n)` a bound of `|input|`.

    It equals `|lam| . |T|(reach)` (the block with absolute weights and biases applied to
    `reach`), which costs one forward pass per domain instead of one backward pass per row.
    """
    image = block.forward(reach.reshape(-1, *block.in_shape)).reshape(len(reach), 1, -1)
    return (lam.abs().reshape(batch, rows, -1) * image).sum(dim=2).reshape(-1)
