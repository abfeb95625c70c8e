"""The coupled ReLU offset against brute-force minimisation, and its soundness on boxes and balls."""

from __future__ import annotations

import numpy as np
import torch

from lipverify.bounds.relaxation import ReluBounds, best_multiplier, coupled_offset


def _random_layer(seed, n=5):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=n)
    lo = c - rng.uniform(0.05, 2.0, n)
    hi = c + rng.uniform(0.05, 2.0, n)
    radius = rng.uniform(0.1, 2.0)
    p = rng.normal(size=n)
    g = p * rng.uniform(0, 1, n) + rng.normal(size=n) * 0.3
    bounds = ReluBounds(*(torch.tensor(v[None]) for v in (lo, hi, c)),
                        torch.tensor([radius], dtype=torch.float64))
    return bounds, torch.tensor(p[None, None]), torch.tensor(g[None, None]), rng


def test_offset_equals_brute_force_minimum():
    for seed in range(40):
        bounds, p, g, rng = _random_layer(seed)
        lam = float(rng.uniform(0, 3))
        h = float(coupled_offset(bounds, p, g, torch.tensor([[lam]], dtype=torch.float64)))
        brute = -lam * float(bounds.radius) ** 2 / 2
        for i in range(p.shape[-1]):
            t = np.linspace(float(bounds.lower[0, i]), float(bounds.upper[0, i]), 200001)
            vals = (float(p[0, 0, i]) * np.maximum(t, 0) - float(g[0, 0, i]) * t
                    + lam / 2 * (t - float(bounds.centre[0, i])) ** 2)
            brute += vals.min()
        assert h <= brute + 1e-9, f"seed {seed}: offset {h} above the grid minimum {brute}"
        # The grid minimum exceeds the true one by up to (slope x grid step) per coordinate.
        assert h >= brute - 1e-4, f"seed {seed}: offset {h} far below the grid minimum {brute}"


def test_offset_sound_on_box_and_ball_samples():
    """p.relu(z) - g.z >= h at sampled z inside both the box and the ball."""
    for seed in range(40):
        bounds, p, g, rng = _random_layer(seed)
        lam = best_multiplier(bounds, p, g)
        h = float(coupled_offset(bounds, p, g, lam))
        lo, hi = bounds.lower[0].numpy(), bounds.upper[0].numpy()
        c, r = bounds.centre[0].numpy(), float(bounds.radius)
        z = rng.uniform(lo, hi, size=(20000, len(c)))
        z = z[np.linalg.norm(z - c, axis=1) <= r]
        vals = np.maximum(z, 0) @ p[0, 0].numpy() - z @ g[0, 0].numpy()
        if len(vals):
            assert vals.min() >= h - 1e-9, f"seed {seed}"


def test_best_multiplier_beats_zero_and_fixed_choices():
    for seed in range(40):
        bounds, p, g, _ = _random_layer(seed, n=30)
        lam = best_multiplier(bounds, p, g)
        best = float(coupled_offset(bounds, p, g, lam))
        for other in (0.0, 0.01, 0.1, 1.0, 10.0):
            value = float(coupled_offset(bounds, p, g, torch.tensor([[other]], dtype=torch.float64)))
            assert best >= value - 1e-6 * (1 + abs(value)), f"seed {seed}: lam {other} better"
