"""Tiny random ReLU networks shared by the bounds tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tiny_mlp(seed: int, widths: tuple[int, ...] = (2, 12, 12, 3), scale: float = 1.0) -> nn.Module:
    """A random ReLU MLP (float64), weights scaled by `scale`."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=torch.float64) * scale
                             / np.sqrt(a))
            lin.bias.copy_(torch.randn(b, generator=gen, dtype=torch.float64) * 0.3)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def ball_samples(x0: np.ndarray, rho: float, grid: int = 121, boundary: int = 4000) -> np.ndarray:
    """A dense grid of the 2-D disc plus points on its boundary circle."""
    t = np.linspace(-rho, rho, grid)
    gx, gy = np.meshgrid(t, t)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    pts = pts[np.linalg.norm(pts, axis=1) <= rho]
    ang = np.linspace(0, 2 * np.pi, boundary, endpoint=False)
    circle = rho * np.stack([np.cos(ang), np.sin(ang)], 1)
    return x0[None, :] + np.concatenate([pts, circle])
