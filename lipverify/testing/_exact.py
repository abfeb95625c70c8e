"""Independent references for Lipschitz constants: exact values and sampled lower bounds.

Nothing here reads lipverify's layer view: the references are computed from the torch module
(weights as float64), so a bug in the view cannot hide a bug in a backend.

- `exact_lipschitz_2d`: the exact global Lipschitz constant of a 2-input network built from
  `Linear`, `ReLU` and `LeakyReLU` (a continuous piecewise-linear map). Such a map's Lipschitz
  constant is the largest operator norm of its Jacobian over its full-dimensional linear regions;
  the regions are enumerated by cutting the plane with every neuron's zero line, layer by layer.
  Each region's Jacobian is read at an interior point from the activation pattern of a float64
  forward pass there, so every value is the Jacobian of the map at a real point: the result is
  exact on a disc of radius `radius` (regions further out are not seen, which can only lower it).
- `jacobian_lower_bound`: the largest Jacobian norm over random points and finite-difference
  quotients: a lower bound on the Lipschitz constant of any network.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lipverify.types import Norm

# Pieces whose interior point has a pre-activation this close to zero (relative) are slivers
# of float noise; they are skipped, which can only lower the enumerated maximum.
SLIVER_REL_TOL = 1e-9
DEFAULT_RADIUS = 50.0


def operator_norm(jac: np.ndarray, norm: Norm) -> float:
    """`||J||` from `norm` on inputs to `norm` on outputs (spectral norm or max row sum)."""
    jac = np.atleast_2d(np.asarray(jac, np.float64))
    if norm == Norm.L2:
        return float(np.linalg.norm(jac, 2))
    return float(np.max(np.sum(np.abs(jac), axis=1)))


@dataclass(frozen=True)
class _Piece:
    """A convex polygon (vertices in order) and the affine map `x -> a x + c` on it."""

    vertices: np.ndarray
    a: np.ndarray
    c: np.ndarray


def piecewise_linear_layers(module: nn.Module) -> list[tuple[np.ndarray, np.ndarray, float | None]]:
    """`(W, b, negative_slope or None)` per Linear layer of a Linear/ReLU/LeakyReLU sequence."""
    mods = [m for m in module.modules() if not isinstance(m, (nn.Sequential, nn.Flatten,
                                                              nn.Identity))]
    layers: list[tuple[np.ndarray, np.ndarray, float | None]] = []
    for m in mods:
        if isinstance(m, nn.Linear):
            w = m.weight.detach().double().cpu().numpy()
            b = (m.bias.detach().double().cpu().numpy() if m.bias is not None
                 else np.zeros(w.shape[0]))
            layers.append((w, b, None))
        elif isinstance(m, (nn.ReLU, nn.LeakyReLU)) and layers and layers[-1][2] is None:
            slope = float(m.negative_slope) if isinstance(m, nn.LeakyReLU) else 0.0
            w, b, _ = layers[-1]
            layers[-1] = (w, b, slope)
        else:
            raise ValueError(f"not a Linear/ReLU/LeakyReLU sequence: {type(m).__name__}")
    if not layers:
        raise ValueError("no Linear layer")
    return layers


def _split(piece: _Piece, row: int, slope_scale: float) -> list[_Piece]:
    """Cut `piece` by the zero line of output `row` of its affine map."""
    a, c, v = piece.a[row], piece.c[row], piece.vertices
    s = v @ a + c
    tol = SLIVER_REL_TOL * slope_scale
    if np.all(s >= -tol) or np.all(s <= tol):
        return [piece]
    sides: tuple[list, list] = ([], [])
    n = len(v)
    for i in range(n):
        p, q, sp, sq = v[i], v[(i + 1) % n], s[i], s[(i + 1) % n]
        if sp >= 0:
            sides[0].append(p)
        if sp <= 0:
            sides[1].append(p)
        if (sp > 0 > sq) or (sp < 0 < sq):
            cut = p + (sp / (sp - sq)) * (q - p)
            sides[0].append(cut)
            sides[1].append(cut)
    return [_Piece(np.array(side), piece.a, piece.c) for side in sides if len(side) >= 3]


def _area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def linear_region_jacobians(module: nn.Module, radius: float = DEFAULT_RADIUS) -> list[np.ndarray]:
    """The Jacobian on each full-dimensional linear region meeting the square `[-radius, radius]^2`.

    Raises:
        ValueError: `module` is not a 2-input Linear/ReLU/LeakyReLU sequence.
    """
    layers = piecewise_linear_layers(module)
    if layers[0][0].shape[1] != 2:
        raise ValueError(f"needs 2 inputs, got {layers[0][0].shape[1]}")
    square = radius * np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    pieces = [_Piece(square, np.eye(2), np.zeros(2))]
    min_area = (2 * radius) ** 2 * 1e-14
    for w, b, slope in layers:
        pieces = [_Piece(p.vertices, w @ p.a, w @ p.c + b) for p in pieces]
        if slope is None:
            continue
        for row in range(w.shape[0]):
            cut = []
            for p in pieces:
                scale = float(np.abs(p.a[row]).sum() * radius + abs(p.c[row])) + 1e-300
                cut.extend(q for q in _split(p, row, scale) if _area(q.vertices) > min_area)
            pieces = cut
        kept = []
        for p in pieces:
            inner = p.vertices.mean(axis=0)  # interior point of a convex polygon
            pre = p.a @ inner + p.c
            scale = np.abs(p.a).sum(axis=1) * radius + np.abs(p.c) + 1e-300
            if np.any(np.abs(pre) <= SLIVER_REL_TOL * scale):
                continue
            d = np.where(pre > 0, 1.0, slope)
            kept.append(_Piece(p.vertices, d[:, None] * p.a, d * p.c))
        pieces = kept
    return [p.a for p in pieces]


def exact_lipschitz_2d(module: nn.Module, norm: Norm, radius: float = DEFAULT_RADIUS) -> float:
    """The Lipschitz constant of a 2-input piecewise-linear `module` (see the module docstring)."""
    return max(operator_norm(j, norm) for j in linear_region_jacobians(module, radius))


def affine_lipschitz(module: nn.Module, norm: Norm) -> float:
    """The exact Lipschitz constant of a sequence of Linear layers: the norm of their product."""
    layers = piecewise_linear_layers(module)
    if any(slope is not None for _, _, slope in layers):
        raise ValueError("not an affine network")
    mat = np.eye(layers[0][0].shape[1])
    for w, _, _ in layers:
        mat = w @ mat
    return operator_norm(mat, norm)


def _double(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().eval()


def jacobians(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """Jacobians `(N, outputs, inputs)` of `module` at the points `x` `(N, *input_shape)`."""
    model = _double(module)
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64).clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(xt).reshape(len(xt), -1)
        rows = []
        for j in range(out.shape[1]):
            (g,) = torch.autograd.grad(out[:, j].sum(), xt, retain_graph=True)
            rows.append(g.reshape(len(xt), -1))
    return torch.stack(rows, dim=1).detach().numpy()


def jacobian_lower_bound(module: nn.Module, input_shape: tuple[int, ...], norm: Norm,
                         samples: int = 256, seed: int = 0) -> float:
    """The largest Jacobian norm and difference quotient over random points near `[0, 1]^d`.

    Both are lower bounds on the Lipschitz constant in `norm` (inputs and outputs): a Jacobian at
    a differentiable point, and `||f(x) - f(x')|| / ||x - x'||` for random pairs.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 1.5, size=(samples, *input_shape))
    best = max(operator_norm(j, norm) for j in jacobians(module, x))
    model = _double(module)
    step = rng.normal(size=x.shape) * 1e-3
    with torch.no_grad():
        fx = model(torch.as_tensor(x)).reshape(samples, -1).numpy()
        fy = model(torch.as_tensor(x + step)).reshape(samples, -1).numpy()
    order = 2 if norm == Norm.L2 else math.inf
    num = np.linalg.norm(fy - fx, ord=order, axis=1)
    den = np.linalg.norm(step.reshape(samples, -1), ord=order, axis=1)
    return max(best, float(np.max(num / den)))
