"""Lipschitz bounds in the parameters: how much the output can move when the weights move.

For a dense feed-forward network `f(x; theta)` (Dense layers, 1-Lipschitz-or-less activations,
shifts, reshapes), with `theta` the weights and biases of its Dense layers, this bounds

    L = sup { ||f(x; t1) - f(x; t2)||_2 / ||t1 - t2||_2 :  ||x||_2 <= R,  t1, t2 in B(theta, delta) }

where `B(theta, delta)` is the L2 ball of radius `delta` around the trained parameters (all of
them as one vector) and the output norm is L2. It is the layer-wise estimate of Herrera, Krach,
Teichmann, "Local Lipschitz bounds of deep neural networks" (arXiv 2004.13135, 2020).

Derivation. Number the Dense layers `k = 1..K` with `(W_k, b_k)`, and let `F_k` be the network
that uses `t2`'s Dense layers up to `k` and `t1`'s after `k` (`F_0 = f(.; t1)`, `F_K = f(.; t2)`).
`F_k` and `F_{k-1}` differ only in layer `k`, whose input `h` is the same in both, so

    ||F_k(x) - F_{k-1}(x)|| <= A_k ||D_k (h, 1)|| <= A_k sqrt(||h||^2 + 1) ||D_k||_F,

with `D_k = [W2_k - W1_k, b2_k - b1_k]` and `A_k` a Lipschitz bound of the layers after `k`
(using `t1`'s weights). Every `W` in the ball has `||W||_2 <= ||W_k||_2 + delta`, so
`A_k = prod_{layers j after k} Lip_j` with `Lip = ||W_j||_2 + delta` for Dense layers and the
activations' constants. `||h||` is at most `H_{k-1}`, the forward norm bound of the input set
through the layers before `k` with any weights in the ball:
`||W' h + b'|| <= min((||W|| + delta) ||h|| + ||b|| + delta, (||[W, b]||_2 + delta) sqrt(||h||^2+1))`,
`||act(z)|| <= Lip ||z|| + |act(0)| sqrt(n)` (capped by `sqrt(n)` for tanh and sigmoid), a shift
adds its norm. Summing the `K` differences and applying Cauchy-Schwarz,

    ||f(x; t1) - f(x; t2)|| <= sum_k c_k ||D_k||_F <= sqrt(sum_k c_k^2) ||t1 - t2||_2,
    c_k = A_k sqrt(H_{k-1}^2 + 1).

For one Dense layer this is `sqrt(R^2 + 1)`, the exact constant (`D = u (x, 1)^T` attains it).
Every step is rounded upwards; spectral norms come from `lipverify.norms.dense`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lipverify.errors import InputError, ModelError
from lipverify.network.layers import Activation, Dense, Layer, Reshape, Shift
from lipverify.network.network import Network
from lipverify.norms.dense import matrix_norm_bound, mul_up, norm2_upper, up

# |act(0)| per activation (the offset of the forward norm bound), and a bound on |act(t)| for
# the bounded ones.
ACTIVATION_AT_ZERO = {"relu": 0.0, "leaky_relu": 0.0, "tanh": 0.0, "groupsort": 0.0,
                      "sigmoid": 0.5}
ACTIVATION_RANGE = {"tanh": 1.0, "sigmoid": 1.0}


@dataclass(frozen=True)
class ParameterLayerFactor:
    """The terms of one Dense layer `k` in the bound.

    Attributes:
        index: Position of the layer in the layer view.
        weight_norm: Upper bound of `||W_k||_2`.
        input_norm: `H_{k-1}`, bound on the norm of the layer's input.
        suffix_lipschitz: `A_k`, Lipschitz bound of what follows (weights in the ball).
        factor: `c_k = A_k sqrt(H_{k-1}^2 + 1)`.

    """

    index: int
    weight_norm: float
    input_norm: float
    suffix_lipschitz: float
    factor: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"index": self.index, "weight_norm": self.weight_norm,
                "input_norm": self.input_norm, "suffix_lipschitz": self.suffix_lipschitz,
                "factor": self.factor}


@dataclass(frozen=True)
class ParameterLipschitzBound:
    """A sound bound `value` of the Lipschitz constant in the parameters (see the module doc)."""

    value: float
    input_radius: float
    param_radius: float
    num_parameters: int
    layers: tuple[ParameterLayerFactor, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"value": self.value, "input_radius": self.input_radius,
                "param_radius": self.param_radius, "num_parameters": self.num_parameters,
                "layers": [f.to_json() for f in self.layers]}


def check_radii(input_radius: float, param_radius: float) -> tuple[float, float]:
    """Both radii as floats: the input radius finite and >= 0, the parameter radius > 0."""
    r, d = float(input_radius), float(param_radius)
    if not (math.isfinite(r) and r >= 0):
        raise InputError(f"input radius must be a finite number >= 0, got {input_radius!r}")
    if not (math.isfinite(d) and d > 0):
        raise InputError(f"parameter radius must be a finite number > 0, got {param_radius!r}")
    return r, d


def dense_feedforward_layers(model: Network | Sequence[Layer]) -> tuple[Layer, ...]:
    """The layer view, checked to be Dense layers, known activations, shifts and reshapes."""
    layers = model.require_layers() if isinstance(model, Network) else tuple(model)
    for i, layer in enumerate(layers):
        ok = isinstance(layer, Dense | Shift | Reshape) or (
            isinstance(layer, Activation) and layer.kind in ACTIVATION_AT_ZERO)
        if not ok:
            name = layer.kind if isinstance(layer, Activation) else type(layer).__name__
            raise ModelError(f"parameter Lipschitz bounds cover dense feed-forward networks "
                             f"only; layer {i} is {name}")
    if not any(isinstance(layer, Dense) for layer in layers):
        raise ModelError("the network has no Dense layer: no parameters to perturb")
    return layers


def _norm_out(layer: Layer, h: float, delta: float, weight_norm: float) -> float:
    """A bound on the norm of the layer's output when its input has norm at most `h`."""
    if isinstance(layer, Dense):
        w = layer.weight.detach().cpu().numpy().astype(np.float64)
        b = layer.bias.detach().cpu().numpy().astype(np.float64)
        split = up(up(mul_up(up(weight_norm + delta), h) + float(norm2_upper(b))) + delta)
        joint = matrix_norm_bound(np.hstack([w, b[:, None]])).value
        return float(min(split, mul_up(float(up(joint + delta)), _sqrt_sq_plus_one(h))))
    if isinstance(layer, Shift):
        return float(up(h + float(norm2_upper(layer.shift.detach().cpu().numpy()))))
    if isinstance(layer, Activation):
        n = math.prod(layer.in_shape)
        sqrt_n = float(up(math.sqrt(n)))
        out = float(up(mul_up(float(layer.lipschitz), h)
                       + mul_up(ACTIVATION_AT_ZERO[layer.kind], sqrt_n)))
        if layer.kind in ACTIVATION_RANGE:
            out = min(out, mul_up(ACTIVATION_RANGE[layer.kind], sqrt_n))
        return out
    return h  # Reshape


def _sqrt_sq_plus_one(h: float) -> float:
    return float(up(math.sqrt(up(mul_up(h, h) + 1.0))))


def parameter_lipschitz_bound(model: Network | Sequence[Layer], input_radius: float,
                              param_radius: float) -> ParameterLipschitzBound:
    """A sound bound of the output's Lipschitz constant in the parameters (module doc).

    Args:
        model: A dense feed-forward network (or its layers).
        input_radius: `R`: every input of interest has `||x||_2 <= R` (for a box, the norm of
            its corner farthest from 0).
        param_radius: `delta > 0`: both parameter vectors lie within `delta` (L2, all parameters
            together) of the network's own.

    Example:
        >>> import torch
        >>> from lipverify.network.layers import Dense
        >>> layer = Dense(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
        ...               (2,), (2,))
        >>> round(parameter_lipschitz_bound([layer], 3.0, 0.1).value, 9)  # sqrt(3^2 + 1)
        3.16227766
    """
    r, delta = check_radii(input_radius, param_radius)
    layers = dense_feedforward_layers(model)
    weight_norms = [matrix_norm_bound(layer.weight.detach().cpu().numpy().astype(np.float64)).value
                    if isinstance(layer, Dense) else 0.0 for layer in layers]
    lips = [float(up(w + delta)) if isinstance(layer, Dense)
            else float(layer.lipschitz) if isinstance(layer, Activation) else 1.0
            for layer, w in zip(layers, weight_norms, strict=True)]
    suffix = [1.0] * (len(layers) + 1)
    for i in range(len(layers) - 1, -1, -1):
        suffix[i] = mul_up(suffix[i + 1], lips[i])
    factors, h, total = [], r, 0.0
    for i, layer in enumerate(layers):
        if isinstance(layer, Dense):
            c = mul_up(suffix[i + 1], _sqrt_sq_plus_one(h))
            factors.append(ParameterLayerFactor(i, weight_norms[i], h, suffix[i + 1], c))
            total = float(up(total + mul_up(c, c)))
        h = _norm_out(layer, h, delta, weight_norms[i])
    count = sum(layer.weight.numel() + layer.bias.numel() for layer in layers
                if isinstance(layer, Dense))
    return ParameterLipschitzBound(float(up(math.sqrt(total))), r, delta, int(count),
                                   tuple(factors))


def box_radius(lower: np.ndarray | float, upper: np.ndarray | float, size: int = 1) -> float:
    """`R` for the box `[lower, upper]`: the L2 norm of its corner farthest from 0 (rounded up).

    Scalars describe the same interval for each of `size` coordinates.
    """
    lo, hi = np.broadcast_arrays(np.asarray(lower, np.float64), np.asarray(upper, np.float64))
    if np.any(lo > hi):
        raise InputError("box has lower > upper")
    corner = np.maximum(np.abs(lo), np.abs(hi)).ravel()
    if corner.size == 1 and size > 1:
        corner = np.full(size, corner[0])
    return float(norm2_upper(corner))
