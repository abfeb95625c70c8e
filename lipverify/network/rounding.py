"""Outputs at given points with a proven bound on their rounding error.

Certificates are about the network's exact function (its float32 weights taken as exact real
numbers), not about one float32 evaluation of it: a float32 forward pass can round a bias of
2**24 so that a wrong label looks right by a wide margin. Margins therefore come from a float64
evaluation of the layer view, and each output carries an a-priori error bound in the style of
Higham (Accuracy and Stability of Numerical Algorithms, 2002, ch. 3): an affine map with fan-in
`n` computed in precision `u` errs by at most `gamma(n + 1) (|W| |x| + |b|)` whatever the
summation order, and errors already in `x` pass through `|W|`. Activations pass errors on through
their Lipschitz constant and add their own rounding. The bound follows the activations'
magnitudes through every layer, not the size of the output.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from lipverify.network.layers import (
    Activation,
    Conv,
    Dense,
    Layer,
    Reshape,
    Residual,
    Shift,
)

UNIT_ROUNDOFF = 2.0**-53
# Extra roundings per weight that folding (BatchNorm, input normalisation) may have made: the
# layer view's weights are within this many float64 roundings of the exact folded ones.
FOLD_ROUNDINGS = 8
# Library tanh / sigmoid are accurate to a few ulps; this many is a generous allowance.
TRANSCENDENTAL_ULPS = 16
# The error bound is itself computed in float64 (sums of non-negative terms): a small relative
# inflation covers its own rounding.
BOUND_INFLATION = 1.01
# Outputs of networks without a layer view come from a float64 run of the module; without the
# layer magnitudes, the allowance is relative to the outputs (not a proof: see `sound_outputs`).
MODULE_REL_ERROR = 1e-9


@dataclass(frozen=True)
class SoundOutputs:
    """Float64 outputs `(B, K)` and per-output bounds on their distance to the exact values."""

    values: np.ndarray
    error: np.ndarray
    proven: bool = True


def gamma(n: int, u: float = UNIT_ROUNDOFF) -> float:
    """Higham's `gamma_n = n u / (1 - n u)`: relative error of an `n`-term float dot product."""
    nu = n * u
    if nu >= 0.5:
        return float("inf")
    return nu / (1.0 - nu)


def forward_with_error(layers: tuple[Layer, ...], x: torch.Tensor,
                       u: float = UNIT_ROUNDOFF) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `layers` on `x` in float64; return outputs and a bound on their rounding error."""
    h = x.to(torch.float64)
    err = torch.zeros_like(h)
    h, err = _run(layers, h, err, u)
    return h, err * BOUND_INFLATION


def _run(layers: tuple[Layer, ...], h: torch.Tensor, err: torch.Tensor,
         u: float) -> tuple[torch.Tensor, torch.Tensor]:
    for layer in layers:
        h, err = _step(layer, h, err, u)
    return h, err


def _step(layer: Layer, h: torch.Tensor, err: torch.Tensor,
          u: float) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, Dense | Conv):
        return _affine(layer, h, err, u)
    if isinstance(layer, Activation):
        return _activation(layer, h, err, u)
    if isinstance(layer, Shift):
        y = layer.forward(h)
        return y, err + u * y.abs()
    if isinstance(layer, Reshape):
        return layer.forward(h), err.reshape((err.shape[0], *layer.out_shape))
    if isinstance(layer, Residual):
        body, body_err = _run(layer.body, h, err, u)
        y = h + body
        return y, err + body_err + u * y.abs()
    raise TypeError(f"no rounding model for layer {type(layer).__name__}")


def _affine(layer: Dense | Conv, h: torch.Tensor, err: torch.Tensor,
            u: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = layer.forward(h)
    w_abs = layer.weight.abs().to(h.dtype).to(h.device)
    b_abs = layer.bias.abs().to(h.dtype).to(h.device)
    if isinstance(layer, Dense):
        fan_in = layer.weight.shape[1]

        def abs_linear(v: torch.Tensor) -> torch.Tensor:
            return (v.reshape(v.shape[0], -1) @ w_abs.T).reshape((v.shape[0], *layer.out_shape))

        b_full = b_abs
    else:
        fan_in = layer.weight[0].numel()

        def abs_linear(v: torch.Tensor) -> torch.Tensor:
            v = v.reshape((v.shape[0], *layer.in_shape))
            if any(layer.padding):
                v = F.pad(v, layer.padding)
            return F.conv2d(v, w_abs, None, layer.stride, 0, layer.dilation, layer.groups)

        b_full = b_abs.view(1, -1, 1, 1)
    magnitude = abs_linear(h.abs()) + b_full
    rounding = gamma(fan_in + 1 + FOLD_ROUNDINGS, u) * magnitude
    return y, abs_linear(err) + rounding


def _activation(layer: Activation, h: torch.Tensor, err: torch.Tensor,
                u: float) -> tuple[torch.Tensor, torch.Tensor]:
    y = layer.forward(h)
    if layer.kind == "groupsort":
        # Sorting is exact, and moves each coordinate by at most the largest error in its group.
        group = int(layer.param)
        worst = err.reshape(err.shape[0], -1, group).amax(dim=-1, keepdim=True)
        return y, worst.expand(-1, -1, group).reshape(err.shape)
    passed = layer.lipschitz * err
    if layer.kind == "relu":
        return y, passed
    if layer.kind == "leaky_relu":
        return y, passed + u * y.abs()
    ulps = TRANSCENDENTAL_ULPS * u
    return y, passed + ulps * y.abs() + ulps * torch.finfo(torch.float64).tiny


def sound_outputs(network: object, points: np.ndarray) -> SoundOutputs:
    """Outputs of `network` at `points` with a bound on the error of each.

    With a layer view the bound is proven (float64 run, `forward_with_error`); otherwise the
    module runs in float64 and the allowance is `MODULE_REL_ERROR (1 + max |y|)` per input,
    flagged `proven=False`.
    """
    points = np.asarray(points, dtype=np.float64)
    shape = tuple(network.input_shape)
    x = torch.as_tensor(points).reshape((len(points), *shape))
    if network.layers is not None:
        with torch.no_grad():
            y, err = forward_with_error(network.layers, x)
        n = len(points)
        return SoundOutputs(y.reshape(n, -1).cpu().numpy(), err.reshape(n, -1).cpu().numpy())
    values = _module_float64(network.module, x.to(network.device))
    scale = np.max(np.abs(values), axis=1, keepdims=True) if values.size else values
    error = np.broadcast_to(MODULE_REL_ERROR * (1.0 + scale), values.shape).copy()
    return SoundOutputs(values, error, proven=False)


def _module_float64(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The module run in float64 (a copy), or in float32 where it will not convert."""
    try:
        double = copy.deepcopy(module).double()
        with torch.no_grad():
            y = double(x)
    except (RuntimeError, TypeError):
        with torch.no_grad():
            y = module(x.float()).double()
    return y.reshape(x.shape[0], -1).cpu().numpy()
