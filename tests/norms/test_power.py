"""Power iteration is a labelled lower estimate: never above the exact norm, close to it."""

from __future__ import annotations

import torch
from torch import nn

from lipverify.network.extract import extract_layers
from lipverify.network.layers import Conv, Dense
from lipverify.norms.network import layer_norm_bound
from lipverify.norms.power import layer_norm_estimate, power_iteration


def test_dense_estimate_is_below_exact_and_close():
    torch.manual_seed(0)
    w = torch.randn(30, 20, dtype=torch.float64)
    layer = Dense(w, torch.zeros(30, dtype=torch.float64), (20,), (30,))
    exact = float(torch.linalg.matrix_norm(w, ord=2))
    est = layer_norm_estimate(layer, steps=500)
    assert not est.sound and "lower estimate" in est.kind
    assert est.value <= exact * (1 + 1e-12)
    assert est.value >= exact * (1 - 1e-4)
    assert layer_norm_bound(layer) >= exact


def test_conv_estimate_is_below_exact_and_below_the_bound():
    torch.manual_seed(1)
    (layer,) = extract_layers(nn.Conv2d(3, 4, 3, stride=2, padding=1).double(), (3, 9, 9))
    assert isinstance(layer, Conv)
    exact = float(torch.linalg.matrix_norm(layer.matrix(), ord=2))
    est = layer_norm_estimate(layer, steps=300)
    assert est.value <= exact * (1 + 1e-12)
    assert est.value >= 0.99 * exact
    assert layer_norm_bound(layer) >= exact >= est.value * (1 - 1e-12)


def test_power_iteration_on_a_known_operator():
    diag = torch.tensor([5.0, 4.9, 1.0], dtype=torch.float64)
    est = power_iteration(lambda v: v * diag, lambda v: v * diag, (3,), steps=2000)
    assert 4.99 <= est.value <= 5.0
