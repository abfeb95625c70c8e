"""A hypothesis search for false certificates over the constructions of issue 15.

Networks: dense and convolutional, with average pooling of every padding / stride / overlap
form, BatchNorm in front or not, LeakyReLU slopes from negative through ReLU to concave (> 1),
and a hidden layer carrying a huge bias that the next layer cancels (exact in real arithmetic,
ruinous for a float32 forward pass). Labels come from lipverify's own float32 forward pass, as
a user's would, so with a huge bias the centre itself may be misclassified in exact arithmetic.

Oracles, independent of lipverify's bounds:
- L-infinity: at each certified radius an exact MILP (scipy's HiGHS, tests/milp_reference.py)
  finds the box point of smallest margin; a float64 forward pass of the torch module confirms
  it. A confirmed negative margin inside a certified box is a false certificate.
- L2: PGD in float64 with several radii; a confirmed misclassified point closer than the
  certified radius is a false certificate.
Every certifying backend runs on every example; one that declines the net (a concave
activation for auto_LiRPA, say) must say so, never certify.
"""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from milp_reference import min_margin, stages_of
from lipverify.backends.registry import BackendRegistry
from lipverify.errors import LipverifyError
from lipverify.network.load import load_network
from lipverify.orchestrator import Mode, run_cascade
from lipverify.testing import one_torch_thread
from lipverify.types import Perturbation, Problem, Status

REGISTRY = BackendRegistry.from_entry_points()
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
SLOPES = [0.0, 0.01, 0.3, -0.5, 1.5, 2.5]
POOLS = [(2, 2, 1), (2, 1, 0), (3, 1, 1), (3, 2, 1), (2, 2, 0), None]
BIASES = [0.0, 2.0 ** 12, 2.0 ** 24]
CONFIRM = 1e-6  # a float64 margin below -CONFIRM is a counterexample (float64 error is ~1e-9)


def _backends():
    names = []
    for name in ("spectral", "lipsdp", "lirpa", "alpha-crown", "local", "l2prop", "bab"):
        info = REGISTRY.info(name)
        if info.available:
            names.append(name)
    return names


BACKENDS = _backends()


def _net(seed, kind, slope, pool, batchnorm, bias):
    """(module, input shape, blocks): blocks are (affine part, slope after it) for the MILP.

    Dense: Linear - act - Linear(+bias) - act - Linear. Conv: [BatchNorm] - Conv - act -
    [AvgPool] - Flatten - Linear, as in the issue (a hidden layer after the pooling hides
    auto_LiRPA 0.3's pooling error), with a hidden Linear(+bias) - act in front of the last
    layer only when a huge bias is drawn.
    """
    torch.manual_seed(seed)
    act = (lambda: nn.LeakyReLU(slope)) if slope else nn.ReLU
    if kind == "dense":
        shape, width = (4,), 8
        blocks = [(nn.Sequential(nn.Linear(4, width)), slope)]
        tail = []
    else:
        shape = (2, 5, 5)
        front = [nn.BatchNorm2d(2)] if batchnorm else []
        tail = [nn.AvgPool2d(*pool)] if pool else []
        tail.append(nn.Flatten())
        with torch.no_grad():
            width = nn.Sequential(*tail)(torch.zeros(1, 3, 5, 5)).shape[1]
        if front:
            bn = front[0]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 2.0)
            bn.weight.data.uniform_(0.5, 2.0)
            bn.bias.data.uniform_(-0.5, 0.5)
        blocks = [(nn.Sequential(*front, nn.Conv2d(2, 3, 3, padding=1)), slope)]
    if kind == "dense" or bias:
        hidden = nn.Linear(width, 8)
        with torch.no_grad():
            hidden.bias += bias
        blocks.append((nn.Sequential(*tail, hidden), slope))
        tail, width = [], 8
    last = nn.Linear(width, 3)
    if bias:  # rows summing to zero cancel the common bias exactly in real arithmetic
        with torch.no_grad():
            last.weight -= last.weight.mean(1, keepdim=True)
    blocks.append((nn.Sequential(*tail, last), None))
    layers = []
    for block, s in blocks:
        layers += [*block] + ([act()] if s is not None else [])
    return nn.Sequential(*layers).eval(), shape, blocks


def _run(name, net, problem):
    """Certificates of one backend (None where it declines the net or problem)."""
    backend = REGISTRY.create(name)
    if backend.supports(net, problem) is not None:
        return None
    try:
        return run_cascade(net, problem, [backend], Mode.RADIUS).best
    except LipverifyError as err:  # a one-line refusal (concave activation, say) is fine
        assert "\n" not in str(err).strip(), f"{name}: refusal is not one line: {err}"
        return None


def _margin64(module64, x, label):
    with torch.no_grad():
        out = module64(torch.as_tensor(x, dtype=torch.float64)[None])[0].numpy()
    return out[label] - np.delete(out, label).max()


def _linf_counterexample(stages, module64, x0, label, radius):
    """A confirmed misclassified point of the L-inf ball of `radius` around x0, or None."""
    flat = x0.astype(np.float64).ravel()
    if _margin64(module64, x0, label) < -CONFIRM:
        return x0
    for other in range(3):
        if other == label:
            continue
        point = min_margin(stages, flat - radius, flat + radius, label, other)
        if point is not None:
            point = point.reshape(x0.shape)
            if _margin64(module64, point, label) < -CONFIRM:
                return point
    return None


RADII = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2], dtype=torch.float64)


def _l2_distance(module64, x0, label, seed, steps=60):
    """Smallest L2 distance of a float64-confirmed misclassified point PGD finds (inf if none)."""
    torch.manual_seed(seed)
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    if _margin64(module64, x0.numpy(), label) < -CONFIRM:
        return 0.0
    k = len(RADII)
    base = x0[None].expand(k, *x0.shape)
    radius = RADII.view(-1, *([1] * x0.dim()))
    delta = (torch.randn_like(base) * 1e-3).requires_grad_(True)
    best = float("inf")
    for _ in range(steps):
        out = module64(base + delta)
        other = out.clone()
        other[:, label] = -1e30
        margin = out[:, label] - other.max(1).values
        wrong = margin < -CONFIRM
        if wrong.any():
            best = min(best, float(delta.detach().flatten(1).norm(dim=1)[wrong].min()))
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            norms = grad.flatten(1).norm(dim=1).view(radius.shape) + 1e-30
            delta -= radius / 8 * grad / norms
            scale = (radius.flatten() / (delta.flatten(1).norm(dim=1) + 1e-30)).clamp(max=1)
            delta *= scale.view(radius.shape)
    return best


def test_the_search_covers_the_sound_backends():
    assert {"spectral", "lirpa", "local"} <= set(BACKENDS)


NETS = dict(seed=st.integers(0, 10_000), kind=st.sampled_from(["dense", "conv"]),
            slope=st.sampled_from(SLOPES), pool=st.sampled_from(POOLS),
            batchnorm=st.booleans(), bias=st.sampled_from(BIASES))


def _issue_cases(test):
    """Always check one net of each family the pre-fix code certified falsely, whatever the
    random draws (which of 12 draws hit a bad case is luck)."""
    for seed, kind, slope, pool, bias in ((0, "conv", 0.0, (2, 2, 1), 0.0),   # pool padding
                                          (2, "conv", 0.0, None, 2.0 ** 24),  # cancelling bias
                                          (0, "dense", 1.5, None, 0.0)):      # concave slope
        test = example(seed=seed, kind=kind, slope=slope, pool=pool, batchnorm=False,
                       bias=bias)(test)
    return test


@SETTINGS
@_issue_cases
@given(**NETS)
def test_no_false_linf_certificate(seed, kind, slope, pool, batchnorm, bias):
    module, shape, blocks = _net(seed, kind, slope, pool, batchnorm, bias)
    module64 = _double(module)
    stages = stages_of(blocks, shape)
    net = load_network(module, shape)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(2, *shape)).astype(np.float32)
    labels = net.forward(x).argmax(1)
    problem = Problem.robustness(x, labels, 3, Perturbation.ball("inf", 0.05), want_radius=True)
    with one_torch_thread():
        for name in BACKENDS:
            certs = _run(name, net, problem)
            for k, cert in enumerate(certs or []):
                radius = cert.radius if cert.status != Status.FALSIFIED else 0.0
                if cert.status == Status.VERIFIED:
                    radius = max(radius, 0.05)
                if radius <= 0:
                    continue
                bad = _linf_counterexample(stages, module64, x[k], int(labels[k]), radius)
                assert bad is None, (f"{name} certified L-inf radius {radius:.6g} at input {k} "
                                     f"of {kind} net (seed {seed}, slope {slope}, pool {pool}, "
                                     f"bn {batchnorm}, bias {bias:g}); MILP point margin "
                                     f"{_margin64(module64, bad, int(labels[k])):.6g}")


@SETTINGS
@_issue_cases
@given(**NETS)
def test_no_false_l2_certificate(seed, kind, slope, pool, batchnorm, bias):
    module, shape, _ = _net(seed, kind, slope, pool, batchnorm, bias)
    module64 = _double(module)
    net = load_network(module, shape)
    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(-1, 1, size=(2, *shape)).astype(np.float32)
    labels = net.forward(x).argmax(1)
    problem = Problem.robustness(x, labels, 3, Perturbation.ball(2, 0.1), want_radius=True)

    @cache
    def attacked(k):  # one PGD per input, shared by every backend's check
        return _l2_distance(module64, x[k], int(labels[k]), seed)

    with one_torch_thread():
        for name in BACKENDS:
            certs = _run(name, net, problem)
            for k, cert in enumerate(certs or []):
                if cert.status == Status.FALSIFIED or cert.radius <= 0:
                    continue
                dist = attacked(k)
                assert cert.radius <= dist, (
                    f"{name} certified L2 radius {cert.radius:.6g} but a point at {dist:.6g} "
                    f"is misclassified (input {k}, {kind} net, seed {seed}, slope {slope}, "
                    f"pool {pool}, bn {batchnorm}, bias {bias:g})")


def _double(module):
    return copy.deepcopy(module).double().eval()


@pytest.mark.parametrize("slope", [0.0, 0.3, -0.5, 2.5])
def test_milp_reference_matches_a_dense_grid(slope):
    """The MILP's minimum is the true minimum: no grid point of a 2-D box has a smaller margin."""
    torch.manual_seed(3)
    act = nn.LeakyReLU(slope) if slope else nn.ReLU()
    l1, l2 = nn.Linear(2, 6).double(), nn.Linear(6, 3).double()
    module = nn.Sequential(l1, act, l2).eval()
    stages = stages_of([(l1, slope), (l2, None)], (2,))
    lo, hi = np.array([-0.7, -0.2]), np.array([0.4, 0.9])
    g = np.stack(np.meshgrid(np.linspace(lo[0], hi[0], 301), np.linspace(lo[1], hi[1], 301)), -1)
    with torch.no_grad():
        out = module(torch.as_tensor(g.reshape(-1, 2))).numpy()
    for other in (1, 2):
        point = min_margin(stages, lo, hi, 0, other)
        assert np.all(point >= lo) and np.all(point <= hi)
        with torch.no_grad():
            at = module(torch.as_tensor(point)[None])[0].numpy()
        grid_min = (out[:, 0] - out[:, other]).min()
        assert at[0] - at[other] <= grid_min + 1e-9
