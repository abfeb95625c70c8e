"""Sampled lower bounds of the Lipschitz constant in the parameters (beside the sound bound).

Every number here is the ratio `||f(x; t1) - f(x; t2)|| / ||t1 - t2||` of one actual triple with
`||x||_2 <= R` and `t1, t2` in the ball `B(theta, delta)` (see `lipverify.parameter_lipschitz`),
so it is a lower bound of the supremum that `parameter_lipschitz_bound` bounds from above (up to a
relative `ROUNDING_SLACK` for float64 rounding). Triples: random inputs on the sphere of radius
`R` with random parameters in the ball (independent pairs and close pairs), then normalised
gradient ascent of the ratio over all three, projected back onto the sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lipverify.lower_bounds import ROUNDING_SLACK
from lipverify.network.layers import Dense, Layer
from lipverify.network.network import Network
from lipverify.parameter_lipschitz import check_radii, dense_feedforward_layers

# Projections onto the balls land this far (relatively) inside, so rounding never leaves them.
INSIDE = 1.0 - 1e-12
# Close pairs start this far apart, relative to the parameter radius.
CLOSE_GAP = 1e-3
# Ascent step relative to each set's radius.
ASCENT_RATE = 0.1


@dataclass(frozen=True)
class ParameterSearchOptions:
    """How hard to search.

    Attributes:
        samples: Random triples (half independent parameter pairs, half close pairs).
        ascent_starts: Best triples the ascent starts from.
        ascent_steps: Ascent steps.

    """

    samples: int = 256
    ascent_starts: int = 16
    ascent_steps: int = 40


@dataclass(frozen=True)
class ParameterLipschitzEstimate:
    """The largest ratio found (a sampled lower bound) and the triple that gave it.

    `x` is the input; `theta_offsets` the distances of `t1`, `t2` from the network's own
    parameters; `pair_distance` is `||t1 - t2||`.
    """

    value: float
    x: np.ndarray
    theta_offsets: tuple[float, float]
    pair_distance: float
    method: str
    label: str = "sampled lower bound"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"value": self.value, "method": self.method, "label": self.label,
                "theta_offsets": list(self.theta_offsets), "pair_distance": self.pair_distance,
                "x": self.x.tolist()}


class _Parametrised:
    """The layer view as a function of a batch of inputs and a batch of parameter vectors."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = tuple(layers)
        parts = []
        for layer in self.layers:
            if isinstance(layer, Dense):
                parts += [layer.weight.double().reshape(-1), layer.bias.double().reshape(-1)]
        self.theta = torch.cat(parts).detach()

    def __call__(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        h, offset = x.reshape((len(x), *self.layers[0].in_shape)), 0
        for layer in self.layers:
            if isinstance(layer, Dense):
                m, n = layer.weight.shape
                w = theta[:, offset:offset + m * n].reshape(-1, m, n)
                b = theta[:, offset + m * n:offset + m * n + m]
                offset += m * n + m
                h = torch.bmm(w, h.reshape(len(h), n, 1)).squeeze(2) + b
                h = h.reshape((len(h), *layer.out_shape))
            else:
                h = layer.forward(h)
        return h.reshape(len(h), -1)


def _project(v: torch.Tensor, radius: float) -> torch.Tensor:
    norms = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    return v * torch.clamp(radius * INSIDE / norms.clamp_min(1e-300), max=1.0)


def _ratios(f: _Parametrised, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor
            ) -> torch.Tensor:
    out = f(torch.cat([x, x]), f.theta + torch.cat([d1, d2]))
    top = torch.linalg.vector_norm(out[:len(x)] - out[len(x):], dim=1)
    return top / torch.linalg.vector_norm(d1 - d2, dim=1).clamp_min(1e-300)


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)


def _ascent(f: _Parametrised, x: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, r: float,
            delta: float, steps: int) -> tuple[torch.Tensor, ...]:
    best = (_ratios(f, x, d1, d2), x, d1, d2)
    for step in range(steps):
        xs, a, b = (t.detach().requires_grad_(True) for t in (x, d1, d2))
        with torch.enable_grad():
            gx, ga, gb = torch.autograd.grad(_ratios(f, xs, a, b).sum(), (xs, a, b))
        rate = ASCENT_RATE * (1 - step / steps)
        gap = torch.linalg.vector_norm(d1 - d2, dim=1, keepdim=True)
        x = _project(x + rate * r * _unit(gx), r) if r > 0 else x
        d1 = _project(d1 + rate * gap * _unit(ga), delta)
        d2 = _project(d2 + rate * gap * _unit(gb), delta)
        value = _ratios(f, x, d1, d2).detach()
        better = value > best[0]
        best = (torch.where(better, value, best[0]),
                *(torch.where(better[:, None], new, old)
                  for new, old in zip((x, d1, d2), best[1:], strict=True)))
    return best


def parameter_lipschitz_lower(model: Network | Sequence[Layer], input_radius: float,
                              param_radius: float, *, seed: int = 0,
                              options: ParameterSearchOptions | None = None
                              ) -> ParameterLipschitzEstimate:
    """A sampled lower bound of the Lipschitz constant in the parameters, with its input.

    Same set-up as `parameter_lipschitz_bound`: inputs `||x||_2 <= input_radius`, parameters
    within `param_radius` of the network's own.
    """
    r, delta = check_radii(input_radius, param_radius)
    opts = options or ParameterSearchOptions()
    layers = dense_feedforward_layers(model)
    f = _Parametrised(layers)
    gen = torch.Generator().manual_seed(seed)
    s, p = max(opts.samples, 2), len(f.theta)
    shape = tuple(layers[0].in_shape)
    x = r * INSIDE * _unit(torch.randn(s, math.prod(shape), generator=gen, dtype=torch.float64))
    radii = delta * torch.rand(s, 1, generator=gen, dtype=torch.float64) ** (1.0 / p)
    d1 = _project(radii * _unit(torch.randn(s, p, generator=gen, dtype=torch.float64)), delta)
    d2 = _project(delta * _unit(torch.randn(s, p, generator=gen, dtype=torch.float64)), delta)
    close = d1 + CLOSE_GAP * delta * _unit(torch.randn(s, p, generator=gen, dtype=torch.float64))
    half = s // 2
    d2 = torch.cat([d2[:half], _project(close[half:], delta)])
    with torch.no_grad():
        sampled = _ratios(f, x, d1, d2)
    top = torch.argsort(sampled, descending=True)[:max(1, opts.ascent_starts)]
    found, xa, a, b = _ascent(f, x[top], d1[top], d2[top], r, delta, opts.ascent_steps)
    k = int(torch.argmax(found))
    method = "ascent" if float(found[k]) > float(sampled.max()) else "random"
    offsets = tuple(float(torch.linalg.vector_norm(d[k])) for d in (a, b))
    return ParameterLipschitzEstimate(
        float(found[k]) * (1 - ROUNDING_SLACK), xa[k].numpy().reshape(shape), offsets,
        float(torch.linalg.vector_norm(a[k] - b[k])), method)
