"""Power iteration: LOWER ESTIMATES of operator norms, never used in a certificate.

`||A v|| / ||v||` is at most `||A||_2` for every `v`, so power iteration approaches the norm from
below (up to rounding). It feeds "empirical lower bound" columns and benchmarks only
(Miyato et al., "Spectral normalization for GANs", ICLR 2018, popularised its use as an
estimate; it is not a bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lipverify.network.layers import Conv, Dense

DEFAULT_POWER_STEPS = 100
# Stop once the estimate changes by less than this (relative).
POWER_REL_TOL = 1e-10


@dataclass(frozen=True)
class NormEstimate:
    """A lower estimate of an operator norm (`sound` is always False: not a bound)."""

    value: float
    steps: int
    sound: bool = False
    kind: str = "lower estimate (power iteration)"


def power_iteration(apply: Callable[[torch.Tensor], torch.Tensor],
                    adjoint: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple[int, ...],
                    steps: int = DEFAULT_POWER_STEPS, seed: int = 0) -> NormEstimate:
    """Lower estimate of `||A||_2` from `A` and its transpose (acting on `(1, *in_shape)`)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn((1, *in_shape), generator=gen, dtype=torch.float64)
    v = v / torch.linalg.vector_norm(v)
    value, taken = 0.0, 0
    for taken in range(1, steps + 1):
        av = apply(v)
        new = float(torch.linalg.vector_norm(av))
        w = adjoint(av)
        norm_w = float(torch.linalg.vector_norm(w))
        if norm_w == 0.0 or not math.isfinite(norm_w):
            value = new
            break
        v = w / norm_w
        converged = abs(new - value) <= POWER_REL_TOL * max(new, 1e-300)
        value = max(value, new)
        if converged:
            break
    return NormEstimate(value, taken)


def layer_norm_estimate(layer: Dense | Conv, steps: int = DEFAULT_POWER_STEPS,
                        seed: int = 0) -> NormEstimate:
    """Power-iteration lower estimate of an affine layer's L2 operator norm (its linear part)."""
    return power_iteration(layer.linear, layer.adjoint, tuple(layer.in_shape), steps, seed)
