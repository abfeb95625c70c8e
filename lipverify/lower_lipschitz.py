"""Certified lower Lipschitz constants: how much a network is guaranteed to preserve distances.

A constant `c` with `||f(x) - f(x')||_2 >= c ||x - x'||_2` for all inputs (a co-Lipschitz or
lower bi-Lipschitz constant) is what bi-Lipschitz ResNets for deterministic uncertainty need
(Liu et al., "Simple and principled uncertainty estimation ... distance awareness", NeurIPS 2020;
Behrmann et al., "Invertible residual networks", ICML 2019). For a composition the constants
multiply, so the bound is a product of per-layer factors, rounded downwards:

- `Residual` `y = x + g(x)`: `||y - y'|| >= ||x - x'|| - ||g(x) - g(x')|| >= (1 - Lip(g)) ||x - x'||`
  with `Lip(g)` lipverify's sound upper bound (`lipverify.norms`); positive only when
  `Lip(g) < 1`. A body that is one square `Dense` map also gets `sigma_min(I + W)` (exact for a
  linear body) and keeps the larger.
- `Dense` with at least as many outputs as inputs: the smallest singular value, from LAPACK in
  float64 lowered by a Weyl margin covering its backward error (as `svd_bound` does upwards).
  `Conv` the same on its exact matrix, when that is small enough to build.
- `Shift`, `Reshape`: isometries (factor 1).
- An elementwise activation whose difference quotients lie in `[lo, hi]` with `lo > 0` (leaky
  ReLU): factor `lo`.
- Anything else (ReLU, tanh, sigmoid, GroupSort, wide or singular layers, large convolutions):
  factor 0 with the reason, which makes the whole bound 0 (nothing is claimed).

Only L2 is supported; other norms are refused with an `InputError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lipverify.errors import InputError
from lipverify.network.layers import Activation, Conv, Dense, Layer, Reshape, Residual, Shift
from lipverify.network.network import Network
from lipverify.norms.conv import EXPLICIT_MAX_ENTRIES, conv_matrix
from lipverify.norms.dense import EPS64, down, mul_up, svd_bound, svd_relative_slack, up
from lipverify.norms.network import layer_bound, product
from lipverify.types import Norm


@dataclass(frozen=True)
class LayerLowerBound:
    """A certified lower Lipschitz factor of one layer, how it was found, and why 0 if it is."""

    kind: str
    value: float
    method: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"kind": self.kind, "value": self.value, "method": self.method,
                "reason": self.reason}


@dataclass(frozen=True)
class LowerLipschitzBound:
    """`value`: certified `c` with `||f(x) - f(x')||_2 >= c ||x - x'||_2` for all `x, x'`.

    `layers` holds the factor of each top-level layer (their product, rounded down, is `value`);
    `reason` says why the bound is 0 when it is.
    """

    value: float
    norm: Norm
    layers: tuple[LayerLowerBound, ...]
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"value": self.value, "norm": self.norm.value, "reason": self.reason,
                "layers": [b.to_json() for b in self.layers]}


def mul_down(a: float, b: float) -> float:
    """A lower bound of the exact product of two non-negative floats."""
    return float(max(down(a * b), 0.0))


def smallest_singular_lower(matrix: np.ndarray) -> float:
    """A sound lower bound of `sigma_min` of a tall or square matrix (0 for a wide one).

    LAPACK's singular values are those of `M + E` with `||E||_2 <= s ||M||_2`,
    `s = svd_relative_slack(m, n)`, up to a relative error of the same order (Demmel & Kahan
    1990); Weyl's inequality `|sigma_i(M) - sigma_i(M + E)| <= ||E||_2` then gives
    `sigma_min(M) >= sigma_hat (1 - s) - s ||M||_2`, with `||M||_2` bounded by `svd_bound`.
    """
    a = np.asarray(matrix, dtype=np.float64)
    m, n = a.shape
    if n == 0:
        return math.inf  # a map from a zero-dimensional space preserves every distance
    if m < n:
        return 0.0
    slack = svd_relative_slack(m, n)
    if slack >= 0.5:
        return 0.0
    sigma = float(np.linalg.svd(a, compute_uv=False)[-1])
    margin = mul_up(slack, svd_bound(a))
    return float(max(down(down(sigma * down(1.0 - slack)) - margin), 0.0))


def _matrix_factor(kind: str, matrix: np.ndarray, method: str) -> LayerLowerBound:
    m, n = matrix.shape
    if m < n:
        return LayerLowerBound(kind, 0.0, method, f"{kind} maps {n} values to {m}: not injective")
    value = smallest_singular_lower(matrix)
    if value <= 0:
        return LayerLowerBound(kind, 0.0, method, f"{kind} is singular to working precision")
    return LayerLowerBound(kind, value, method)


def _dense(layer: Dense) -> LayerLowerBound:
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    return _matrix_factor("dense", w, "sigma_min")


def _conv(layer: Conv) -> LayerLowerBound:
    n_out, n_in = math.prod(layer.out_shape), math.prod(layer.in_shape)
    if n_out * n_in > EXPLICIT_MAX_ENTRIES:
        return LayerLowerBound("conv", 0.0, "none",
                               f"conv matrix {n_out}x{n_in} too large to bound sigma_min")
    return _matrix_factor("conv", conv_matrix(layer).toarray(), "sigma_min (exact matrix)")


def _linear_residual(dense: Dense) -> float:
    """`sigma_min(I + W)` from below: the computed `I + W` differs from the exact one only on the
    diagonal (one rounded addition each), by at most `u max |diag|` in spectral norm."""
    w = dense.weight.detach().cpu().numpy().astype(np.float64)
    a = w + np.eye(len(w))
    err = float(up(EPS64 * float(np.max(np.abs(np.diag(a))))))
    return float(max(down(smallest_singular_lower(a) - err), 0.0))


def _residual(layer: Residual) -> LayerLowerBound:
    body_lip = product(layer_bound(b).l2 for b in layer.body)
    value = float(max(down(1.0 - body_lip), 0.0))
    method = "1 - Lip(body)"
    body = layer.body
    if len(body) == 1 and isinstance(body[0], Dense) and body[0].weight.shape[0] == \
            body[0].weight.shape[1]:
        linear = _linear_residual(body[0])
        if linear > value:
            value, method = linear, "sigma_min(I + W)"
    if value <= 0:
        return LayerLowerBound("residual", 0.0, method,
                               f"residual body has Lipschitz bound {body_lip:.6g} >= 1")
    return LayerLowerBound("residual", value, method)


def _activation(layer: Activation) -> LayerLowerBound:
    lo, _ = layer.slopes
    if layer.elementwise and lo > 0:
        return LayerLowerBound(f"activation:{layer.kind}", float(lo), "smallest slope")
    return LayerLowerBound(f"activation:{layer.kind}", 0.0, "none",
                           f"{layer.kind} is not uniformly distance preserving (no positive "
                           "lower slope)")


def layer_lower_bound(layer: Layer) -> LayerLowerBound:
    """A certified lower Lipschitz factor (L2) of one layer."""
    match layer:
        case Dense():
            return _dense(layer)
        case Conv():
            return _conv(layer)
        case Shift() | Reshape():
            return LayerLowerBound(type(layer).__name__.lower(), 1.0, "isometry")
        case Activation():
            return _activation(layer)
        case Residual():
            return _residual(layer)
    raise InputError(f"no lower Lipschitz bound for layer {type(layer).__name__}")


def lower_lipschitz_bound(model: Network | Sequence[Layer],
                          norm: Norm | str = Norm.L2) -> LowerLipschitzBound:
    """A certified lower Lipschitz constant of a network (or layer sequence) in L2.

    Example:
        >>> import torch
        >>> from lipverify.network.layers import Dense, Residual
        >>> block = Residual((Dense(0.5 * torch.eye(2, dtype=torch.float64),
        ...                         torch.zeros(2, dtype=torch.float64), (2,), (2,)),), (2,))
        >>> round(lower_lipschitz_bound([block]).value, 9)
        1.5
    """
    norm = Norm.parse(norm)
    if norm != Norm.L2:
        raise InputError(f"lower Lipschitz bounds are computed in L2 only (got norm {norm.value})")
    layers = model.require_layers() if isinstance(model, Network) else tuple(model)
    factors = tuple(layer_lower_bound(layer) for layer in layers)
    value = 1.0
    for f in factors:
        value = mul_down(value, f.value)
    reason = next((f"{i}:{f.kind}: {f.reason}" for i, f in enumerate(factors) if f.value <= 0),
                  None)
    return LowerLipschitzBound(value if reason is None else 0.0, norm, factors, reason)
