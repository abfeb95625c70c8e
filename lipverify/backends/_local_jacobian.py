"""Bounds on the Jacobians of margin rows `c.f` given per-neuron slope intervals.

The `local` backend's arithmetic (see `lipverify.backends.local_lipschitz` for the soundness
argument): slope intervals of activations on pre-activation intervals, the interval Jacobian
(Fast-Lip, Weng et al., ICML 2018) and products of row-masked operator norms, all in float64.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from lipverify.errors import ModelError
from lipverify.network.layers import Activation, Conv, Dense, Layer, Reshape

# Largest matrix (entries) kept dense, and largest batch chunk of Gram matrices (entries).
DENSE_NORM_LIMIT = 2 ** 24
# Most floating-point work per input for an exact masked spectral norm (Gram product and
# eigenvalues); larger layers get min(Frobenius, sqrt(||.||_1 ||.||_inf)).
DENSE_WORK_LIMIT = 2 ** 28


def slope_interval(layer: Activation, lower: torch.Tensor,
                   upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval of every difference quotient of the activation on `[lower, upper]`, per neuron."""
    if layer.kind in ("relu", "leaky_relu"):
        neg = layer.param if layer.kind == "leaky_relu" else 0.0
        lo_s, hi_s = min(neg, 1.0), max(neg, 1.0)
        def const(v: float) -> torch.Tensor:  # in lower's dtype: a float32 0.1 exceeds 0.1
            return torch.full_like(lower, v)

        lo = torch.where(lower >= 0, const(1.0), torch.where(upper <= 0, const(neg), const(lo_s)))
        hi = torch.where(lower >= 0, const(1.0), torch.where(upper <= 0, const(neg), const(hi_s)))
        return lo, hi
    if layer.kind not in ("tanh", "sigmoid"):
        raise ModelError(f"no slope interval for activation {layer.kind!r}")
    # Both derivatives are even, peak at 0 and decrease in |z|.
    deriv = (lambda z: 1 - torch.tanh(z) ** 2) if layer.kind == "tanh" else \
        (lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)))
    nearest = torch.where((lower <= 0) & (upper >= 0), torch.zeros_like(lower),
                          torch.minimum(lower.abs(), upper.abs()))
    farthest = torch.maximum(lower.abs(), upper.abs())
    return deriv(farthest) * (1 - 1e-12), deriv(nearest) * (1 + 1e-12)


def _abs_layer(layer: Dense | Conv) -> Dense | Conv:
    return dataclasses.replace(layer, weight=layer.weight.abs())


def _dense_matrix(layer: Dense | Conv) -> torch.Tensor:
    return layer.weight if isinstance(layer, Dense) else layer.matrix()


class LocalJacobian:
    """Bounds on the Jacobians of rows `c.f` given per-neuron slope intervals (float64).

    Args:
        layers: A feed-forward layer view with elementwise activations.
        dense_norm_limit: Largest masked matrix (entries x batch) normed exactly.
    """

    def __init__(self, layers: tuple[Layer, ...], dense_norm_limit: int = DENSE_NORM_LIMIT) -> None:
        self.layers = layers
        self.limit = dense_norm_limit
        self._abs = {id(x): _abs_layer(x) for x in layers if isinstance(x, (Dense, Conv))}
        self._grams: dict[int, torch.Tensor | None] = {}

    def interval_magnitude(self, slopes: list[tuple[torch.Tensor, torch.Tensor]],
                           rows: torch.Tensor) -> torch.Tensor:
        """`|centre| + radius` of the interval Jacobian of each row: shape `(B, S, inputs)`."""
        b, s, k = rows.shape
        centre = rows.reshape(b * s, k)
        radius = torch.zeros_like(centre)
        acts = iter(reversed(slopes))
        for layer in reversed(self.layers):
            if isinstance(layer, (Dense, Conv)):
                centre = layer.adjoint(centre)
                radius = self._abs[id(layer)].adjoint(radius)
            elif isinstance(layer, Activation):
                lo, hi = (t.reshape(b, 1, -1).expand(b, s, -1).reshape(b * s, -1)
                          for t in next(acts))
                shape = centre.shape
                c_lo, c_hi = (centre - radius).reshape(b * s, -1), (centre + radius).reshape(
                    b * s, -1)
                prods = torch.stack([c_lo * lo, c_lo * hi, c_hi * lo, c_hi * hi])
                p_lo, p_hi = prods.min(dim=0).values, prods.max(dim=0).values
                centre, radius = ((p_lo + p_hi) / 2).reshape(shape), ((p_hi - p_lo) / 2).reshape(
                    shape)
            elif isinstance(layer, Reshape):
                centre = centre.reshape((b * s, *layer.in_shape))
                radius = radius.reshape((b * s, *layer.in_shape))
        mag = centre.abs() + radius
        return mag.reshape(b, s, -1)

    def _gram(self, layer: Dense | Conv) -> torch.Tensor | None:
        """`W W^T` when `W` is wide, else `W` itself (for `W^T M^2 W`), if small enough."""
        if id(layer) not in self._grams:
            out_n, in_n = math.prod(layer.out_shape), math.prod(layer.in_shape)
            gram = None
            if out_n * in_n <= self.limit:
                w = _dense_matrix(layer)
                gram = w @ w.T if out_n <= in_n else w
            self._grams[id(layer)] = gram
        return self._grams[id(layer)]

    def _masked_norm(self, layer: Dense | Conv, mask: torch.Tensor) -> torch.Tensor:
        """Upper bound on `||diag(mask) W||_2` per input (mask shape `(B, outputs)`)."""
        b = mask.shape[0]
        gram = self._gram(layer)
        out_n, in_n = math.prod(layer.out_shape), math.prod(layer.in_shape)
        side = min(out_n, in_n)
        work = side ** 3 + (out_n * in_n * side if out_n > in_n else side * side)
        if gram is not None and work <= DENSE_WORK_LIMIT:
            tops = []
            step = max(1, self.limit // (side * side))
            for m in mask.split(step):
                if out_n <= in_n:  # M W W^T M
                    g = m[:, :, None] * gram[None] * m[:, None, :]
                else:  # W^T M^2 W
                    g = torch.einsum("oi,bo,oj->bij", gram, m ** 2, gram)
                tops.append(torch.linalg.eigvalsh(g)[:, -1].clamp_min(0))
            return torch.cat(tops).sqrt() * (1 + 1e3 * torch.finfo(torch.float64).eps * side)
        abs_layer = self._abs[id(layer)]
        ones = torch.ones((b, *layer.in_shape), dtype=torch.float64)
        row_abs = abs_layer.linear(ones).reshape(b, -1)
        sq = dataclasses.replace(layer, weight=layer.weight ** 2)
        row_sq = sq.linear(ones).reshape(b, -1)
        col_abs = abs_layer.adjoint(mask.reshape((b, *layer.out_shape))).reshape(b, -1)
        inf_norm = (mask * row_abs).max(dim=1).values
        one_norm = col_abs.max(dim=1).values
        frob = ((mask ** 2) * row_sq).sum(dim=1).sqrt()
        return torch.minimum(frob, (inf_norm * one_norm).sqrt()) * (1 + 1e-12)

    def segments(self) -> list[np.ndarray] | None:
        """Dense matrices of the affine maps between activations (and after the last), or None
        when one is too large."""
        mats: list[np.ndarray] = []
        current: torch.Tensor | None = None
        for layer in self.layers:
            if isinstance(layer, (Dense, Conv)):
                if math.prod(layer.out_shape) * math.prod(layer.in_shape) > self.limit:
                    return None
                w = _dense_matrix(layer)
                current = w if current is None else w @ current
            elif isinstance(layer, Activation):
                if current is None:
                    return None
                mats.append(current.numpy())
                current = None
        if current is None:
            return None
        return [*mats, current.numpy()]

    def norm_product(self, slopes: list[tuple[torch.Tensor, torch.Tensor]],
                     rows: torch.Tensor) -> torch.Tensor:
        """L2 bound `||W_L^T c|| prod_k ||M_k W_k ... ||` per row: shape `(B, S)`."""
        b, s, k = rows.shape
        factor = torch.ones(b, dtype=torch.float64)
        segment: list[Dense | Conv] = []
        acts = iter(slopes)
        for layer in self.layers:
            if isinstance(layer, (Dense, Conv)):
                segment.append(layer)
            elif isinstance(layer, Activation):
                lo, hi = next(acts)
                mask = torch.maximum(lo.abs(), hi.abs()).reshape(b, -1)
                if not segment:
                    factor = factor * mask.max(dim=1).values
                for i, aff in enumerate(reversed(segment)):
                    factor = factor * self._masked_norm(aff, mask if i == 0 else
                                                        torch.ones_like(factor)[:, None].expand(
                                                            b, math.prod(aff.out_shape)))
                segment = []
        g = rows.reshape(b * s, k)
        for aff in reversed(segment):
            g = aff.adjoint(g)
        return factor[:, None] * g.reshape(b, s, -1).norm(dim=2)
