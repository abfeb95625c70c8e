"""The `lirpa` / `alpha-crown` backends: equal to raw auto_LiRPA, sound against PGD, radius
search, general properties, boxes, batching and the module fallbacks."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.backends._lirpa_compat import load_auto_lirpa
from lipverify.backends._margin_search import Region, Spec, run_in_chunks
from lipverify.backends.lirpa import (
    AlphaCrownBackend,
    LirpaAdapter,
    LirpaBackend,
    LirpaOptions,
    Method,
)
from lipverify.data import load_data
from lipverify.errors import InputError, ResourceError
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.load import build_network, load_network
from lipverify.network.modules import GroupSort
from lipverify.network.network import Network
from lipverify.types import Norm, Perturbation, Problem, Property, Status

N_INPUTS = 40
EPS = {Norm.LINF: 0.02, Norm.L2: 0.3}


@pytest.fixture(scope="module")
def data():
    return load_data("digits", limit=N_INPUTS)


@pytest.fixture(scope="module")
def networks():
    return {name: build_network(load_shipped(name), INPUT_SHAPE)
            for name in ("digits_mlp", "digits_cnn")}


def _robust_c(labels, k=10):
    c = np.zeros((len(labels), k - 1, k))
    for i, t in enumerate(labels):
        for r, j in enumerate(j for j in range(k) if j != t):
            c[i, r, t], c[i, r, j] = 1.0, -1.0
    return c


# lipverify bounds every intermediate neuron by CROWN (auto_LiRPA's sparse mode picks them from
# the whole batch, so an input's bound would depend on its batch).
FULL = {"sparse_intermediate_bounds": False, "sparse_conv_intermediate_bounds": False}


def _raw_lower(module, x, norm, eps, c, bound_opts=FULL):
    lirpa = load_auto_lirpa()
    # lipverify runs auto_LiRPA in float64 (float32 rounds large activations away)
    bounded = lirpa.BoundedModule(module.double(), torch.zeros((1, *INPUT_SHAPE)).double(),
                                  bound_opts=bound_opts)
    ptb = lirpa.PerturbationLpNorm(norm=np.inf if norm == Norm.LINF else 2, eps=eps)
    # Standard strides: a size-1 channel dim with odd strides picks another conv kernel.
    x = torch.tensor(x).double().clone(memory_format=torch.contiguous_format)
    with torch.no_grad():
        lower, _ = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),),
                                          C=torch.tensor(c, dtype=torch.float64),
                                          method="CROWN")
    return lower.double().numpy()


def pgd(network, x, labels, norm, eps, steps=40, restarts=2, seed=0):
    """Smallest margin found by projected gradient descent (per input)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.tensor(x, dtype=torch.float32)
    lab = torch.as_tensor(labels)
    best = torch.full((len(x0),), np.inf)
    step = 2.5 * eps / steps
    for _ in range(restarts):
        delta = (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps
        if norm == Norm.L2:
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12) * eps \
                * torch.rand((len(x0), 1, 1, 1), generator=gen)
        for _ in range(steps):
            delta.requires_grad_(True)
            out = network.module(x0 + delta)
            other = out.masked_fill(nn.functional.one_hot(lab, 10).bool(), -np.inf).max(1).values
            margin = out.gather(1, lab[:, None])[:, 0] - other
            best = torch.minimum(best, margin.detach())
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                if norm == Norm.LINF:
                    delta = (delta - step * grad.sign()).clamp(-eps, eps)
                else:
                    g = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
                    delta = delta - step * g
                    scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
                    delta = delta * scale.view(-1, 1, 1, 1)
        with torch.no_grad():
            out = network.module(x0 + delta)
            other = out.masked_fill(nn.functional.one_hot(lab, 10).bool(), -np.inf).max(1).values
            best = torch.minimum(best, out.gather(1, lab[:, None])[:, 0] - other)
    return best.numpy()


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_crown_equals_raw_auto_lirpa(networks, data, name, norm):
    x, y = data
    network = networks[name]
    eps = EPS[norm]
    c = _robust_c(y)
    raw = _raw_lower(load_shipped(name), x, norm, eps, c)
    backend = LirpaBackend()
    region = Region.of(Perturbation.ball(norm, eps), x)
    ours = backend.adapter(network).row_bounds(region, c, Method.CROWN)
    np.testing.assert_allclose(ours, raw, atol=1e-6, rtol=0)
    certs = backend.certify(network, Problem.robustness(x, y, 10, Perturbation.ball(norm, eps)))
    raw_count = int(np.sum(np.all(raw > 0, axis=1)))
    assert sum(cert.status == Status.VERIFIED for cert in certs) == raw_count
    assert raw_count > 0
    default = _raw_lower(load_shipped(name), x, norm, eps, c, bound_opts=None)
    assert int(np.sum(np.all(default > 0, axis=1))) == raw_count
    np.testing.assert_allclose(default, raw, atol=1e-5)
    for cert, lower in zip(certs, raw, strict=True):
        if cert.status == Status.VERIFIED:
            assert cert.radius == eps and 0 < cert.margin_lower <= lower.min()


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_verified_inputs_survive_pgd(networks, data, name, norm):
    x, y = data
    eps = EPS[norm] * 1.2
    certs = LirpaBackend().certify(networks[name], Problem.robustness(
        x, y, 10, Perturbation.ball(norm, eps)))
    verified = np.array([c.status == Status.VERIFIED for c in certs])
    assert verified.sum() > 0
    found = pgd(networks[name], x, y, norm, eps)
    assert np.all(found[verified] > 0), "PGD broke an input lirpa verified"
    falsified = np.array([c.status == Status.FALSIFIED for c in certs])
    assert np.all(found[falsified] <= 0)


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_radius_search_is_vectorised_and_checked(networks, data, norm):
    x, y = data
    network = networks["digits_mlp"]
    backend = LirpaBackend(LirpaOptions(radius_rel_tol=0.02))
    problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, EPS[norm]), want_radius=True)
    certs = backend.certify(network, problem)
    radii = np.array([c.radius for c in certs])
    assert np.all(radii >= 0) and radii.max() > EPS[norm]
    for cert in certs:
        assert (cert.status == Status.VERIFIED) == (cert.radius >= EPS[norm])
    # Independent check: each input alone, with auto_LiRPA's scalar eps, at its radius.
    c = _robust_c(y)
    adapter = backend.adapter(network)
    for i in np.flatnonzero(radii > 0)[:8]:
        at = _raw_lower(load_shipped("digits_mlp"), x[i:i + 1], norm, radii[i], c[i:i + 1])
        assert at.min() > 0
        above = adapter.row_bounds(Region.of(Perturbation.ball(norm, radii[i] * 1.05), x[i:i + 1]),
                                   c[i:i + 1], Method.CROWN)
        assert above.min() <= 0.05 * abs(at.min()) + 1e-3  # the search stopped near the edge
    found = pgd(network, x, y, norm, float(np.median(radii[radii > 0])))
    assert np.all(found[radii >= np.median(radii[radii > 0])] > 0)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
def test_per_input_radii_match_scalar_calls(networks, data, name, norm):
    x, _ = data
    x = x[:6]
    network = networks[name]
    adapter = LirpaBackend().adapter(network)
    eps = EPS[norm] * np.linspace(0.5, 2.0, len(x))
    c = _robust_c(np.zeros(len(x), dtype=int))
    region = Region.of(Perturbation.ball(norm, 1.0), x).with_eps(eps)
    batched = adapter.row_bounds(region, c, Method.CROWN)
    single = np.concatenate([_raw_lower(load_shipped(name), x[i:i + 1], norm, eps[i], c[i:i + 1])
                             for i in range(len(x))])
    if name == "digits_cnn" and norm == Norm.L2:
        # auto_LiRPA bounds a first convolution by interval arithmetic with a scalar L2 radius;
        # per-input radii use back-substitution, which is never looser.
        assert np.all(batched >= single - 1e-5)
    else:
        np.testing.assert_allclose(batched, single, atol=1e-5, rtol=1e-5)


def test_general_property_rows_and_terms(networks, data):
    x, y = data
    x = x[:12]
    network = networks["digits_mlp"]
    rng = np.random.default_rng(0)
    terms = [(rng.normal(size=(3, 10)), rng.normal(size=3)),
             (rng.normal(size=(1, 10)), np.array([-5.0]))]
    prop = Property.linear(terms, 10)
    problem = Problem(x, (prop,) * len(x), Perturbation.ball(Norm.LINF, 0.01))
    spec = Spec.build(problem.properties, 10)
    assert spec.c.shape == (len(x), 6, 10)
    adapter = LirpaBackend().adapter(network)
    ours = LirpaBackend().margins(adapter, Region.of(problem.perturbation, x), spec,
                                  Method.CROWN)
    stacked = np.concatenate([c for c, _ in terms])
    raw = _raw_lower(load_shipped("digits_mlp"), x, Norm.LINF, 0.01,
                     np.broadcast_to(stacked, (len(x), 4, 10)).copy())
    d = np.concatenate([d for _, d in terms])
    expected = np.minimum((raw[:, :3] - d[:3]).max(axis=1), raw[:, 3] - d[3])
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    certs = LirpaBackend().certify(network, problem)
    outputs = network.forward(x)
    for cert, e, out in zip(certs, expected, outputs, strict=True):
        assert (cert.status == Status.VERIFIED) == (cert.margin_lower > 0)
        assert cert.margin_lower <= e
        assert cert.margin_lower <= prop.margin(out)


def test_box_equals_ball_and_partial_boxes(networks, data):
    x, y = data
    x, y = x[:10], y[:10]
    network = networks["digits_cnn"]
    eps = 0.02
    ball = LirpaBackend().certify(network, Problem.robustness(x, y, 10,
                                                              Perturbation.ball(Norm.LINF, eps)))
    box = LirpaBackend().certify(network, Problem.robustness(
        x, y, 10, Perturbation.box(x - eps, x + eps)))
    for a, b in zip(ball, box, strict=True):
        assert a.status == b.status
        assert a.margin_lower == pytest.approx(b.margin_lower, abs=1e-5)
    # Only the first row of pixels free: a smaller region, so bounds can only improve.
    lower, upper = x.copy(), x.copy()
    lower[:, :, 0, :] -= 0.05
    upper[:, :, 0, :] += 0.05
    partial = LirpaBackend().certify(network, Problem.robustness(
        x, y, 10, Perturbation.box(lower, upper)))
    wide = LirpaBackend().certify(network, Problem.robustness(
        x, y, 10, Perturbation.ball(Norm.LINF, 0.05)))
    for p, w in zip(partial, wide, strict=True):
        assert p.margin_lower >= w.margin_lower - 1e-5


def test_alpha_crown_at_least_crown_on_cnn(networks, data):
    x, y = data
    x, y = x[:4], y[:4]
    network = networks["digits_cnn"]
    c = _robust_c(y)
    opts = LirpaOptions(alpha_iterations=3)
    alpha = AlphaCrownBackend(opts)
    assert alpha.method == Method.ALPHA_CROWN and alpha.name == "alpha-crown"
    region = Region.of(Perturbation.ball(Norm.LINF, 0.03), x)
    crown = alpha.adapter(network).row_bounds(region, c, Method.CROWN)
    opt = alpha.adapter(network).row_bounds(region, c, Method.ALPHA_CROWN)
    assert np.all(opt >= crown - 1e-4)
    again = alpha.adapter(network).row_bounds(region.with_eps(np.full(4, 0.01)), c,
                                              Method.ALPHA_CROWN)
    assert again.shape == (4, 9)


def test_memory_budget_splits_batches_without_changing_bounds(networks, data):
    x, y = data
    network = networks["digits_mlp"]
    c = _robust_c(y)
    region = Region.of(Perturbation.ball(Norm.L2, 0.3), x)
    whole = LirpaAdapter(network, LirpaOptions()).row_bounds(region, c, Method.CROWN)
    tiny = LirpaAdapter(network, LirpaOptions(memory_budget_gb=1e-5))
    assert tiny.chunk_size(Method.CROWN) < len(x)
    # float32 sums in other batch shapes: equal up to rounding
    np.testing.assert_allclose(tiny.row_bounds(region, c, Method.CROWN), whole, atol=2e-5)


def test_run_in_chunks_halves_on_out_of_memory():
    calls = []

    def fn(index):
        calls.append(len(index))
        if len(index) > 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't "
                               "allocate memory: you tried to allocate 99999999999 bytes")
        return index * 2

    out = run_in_chunks(fn, 10, 8)
    np.testing.assert_array_equal(out, np.arange(10) * 2)
    assert calls[:3] == [8, 4, 2]

    def never(index):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(ResourceError):
        run_in_chunks(never, 3, 2)

    def broken(index):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        run_in_chunks(broken, 3, 2)


def test_untraceable_module_falls_back_to_layer_view(data):
    x, y = data
    x = x[:8]
    traced = torch.fx.symbolic_trace(load_shipped("digits_cnn"))
    network = build_network(traced, INPUT_SHAPE)
    direct = build_network(load_shipped("digits_cnn"), INPUT_SHAPE)
    adapter = LirpaBackend().adapter(network)
    assert adapter.source == "layers"
    c = _robust_c(y[:8])
    region = Region.of(Perturbation.ball(Norm.LINF, 0.02), x)
    np.testing.assert_allclose(adapter.row_bounds(region, c, Method.CROWN),
                               LirpaBackend().adapter(direct).row_bounds(region, c, Method.CROWN),
                               atol=1e-5)


def test_unflatten_then_conv_uses_matrix_mode():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Unflatten(1, (2, 4, 4)),
                           nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(12, 3)).eval()
    network = build_network(module, (1, 4, 4))
    adapter = LirpaBackend().adapter(network)
    assert adapter.source == "layers" and adapter.bounded.conv_mode == "matrix"
    x = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    labels = network.forward(x).argmax(axis=1)
    problem = Problem.robustness(x, labels, 3, Perturbation.ball(Norm.L2, 0.05))
    certs = LirpaBackend().certify(network, problem)
    assert all(c.status in (Status.VERIFIED, Status.UNKNOWN) for c in certs)
    samples = x[:, None] + np.random.default_rng(1).normal(size=(5, 200, 1, 4, 4)).astype(
        np.float32) * 0.05 / 4 / 1.5
    for i, cert in enumerate(certs):
        if cert.status == Status.VERIFIED:
            out = network.forward(samples[i])
            assert np.all(out.argmax(axis=1) == labels[i])


def test_supports_explains_what_it_cannot_bound():
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), GroupSort(2), nn.Linear(4, 2)).eval()
    network = Network(module, (4,), 2, extract_layers(module, (4,)))
    problem = Problem.robustness(np.zeros((1, 4), np.float32), [0], 2,
                                 Perturbation.ball(Norm.L2, 0.1))
    why = LirpaBackend().supports(network, problem)
    assert why is not None and "cannot bound" in why
    asym = nn.Sequential(nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 2)).eval()
    network = build_network(asym, (1, 4, 4))
    problem = Problem.robustness(np.zeros((1, 1, 4, 4), np.float32), [0], 2,
                                 Perturbation.ball(Norm.LINF, 0.1))
    assert "ZeroPad2d" in (LirpaBackend().supports(network, problem) or "")


def test_options_come_from_configs_with_help_and_checked_methods():
    from lipverify.backends.local_lipschitz import LocalOptions
    from lipverify.config import backend_options

    for cls in (LirpaOptions, LocalOptions):
        for f in dataclasses.fields(cls):
            if f.name in ("seed", "timeout"):
                continue
            text = f.metadata.get("help", "")
            assert text[:1].isupper() and text.endswith("."), (cls.__name__, f.name)
    opts = backend_options("lirpa", LirpaOptions, {"method": "alpha-CROWN",
                                                   "alpha_iterations": 5})
    assert LirpaBackend(opts).method == Method.ALPHA_CROWN
    assert LirpaBackend(LirpaOptions(method="ibp")).method == Method.IBP
    assert AlphaCrownBackend().method == Method.ALPHA_CROWN
    with pytest.raises(InputError, match="unknown bound method"):
        LirpaBackend(LirpaOptions(method="beta-CROWN"))


def test_ibp_method_is_sound(networks, data):
    x, y = data
    x, y = x[:10], y[:10]
    network = networks["digits_cnn"]
    backend = LirpaBackend(LirpaOptions(method="IBP"))
    c = _robust_c(y)
    eps = 0.01
    ibp = backend.adapter(network).row_bounds(Region.of(Perturbation.ball(Norm.LINF, eps), x),
                                               c, Method.IBP)
    crown = backend.adapter(network).row_bounds(Region.of(Perturbation.ball(Norm.LINF, eps), x),
                                                 c, Method.CROWN)
    assert np.mean(crown) > np.mean(ibp)  # CROWN is the tighter method here
    rng = np.random.default_rng(0)
    pts = x[:, None] + rng.uniform(-eps, eps, size=(10, 200, *x.shape[1:])).astype(np.float32)
    for i in range(len(x)):
        rows = network.forward(pts[i]) @ c[i].T
        assert np.all(rows.min(axis=0) >= ibp[i] - 1e-5)


MNIST_FC = Path("/work/shared/benchmarks/vnncomp/mnist_fc_2022/onnx/mnist-net_256x2.onnx")


@pytest.mark.skipif(not MNIST_FC.exists(), reason="shared VNN-COMP benchmarks not present")
def test_onnx_graph_module_is_bounded_through_the_layer_view():
    network = load_network(MNIST_FC)
    assert isinstance(network.module, torch.fx.GraphModule)
    x = np.random.default_rng(0).random((4, *network.input_shape)).astype(np.float32)
    labels = network.forward(x).argmax(axis=1)
    eps = 0.01
    backend = LirpaBackend()
    adapter = backend.adapter(network)
    assert adapter.source == "layers"
    c = _robust_c(labels)
    lower = adapter.row_bounds(Region.of(Perturbation.ball(Norm.LINF, eps), x), c, Method.CROWN)
    rng = np.random.default_rng(1)
    for i in range(len(x)):
        pts = x[i] + rng.choice([-eps, eps], size=(300, *x.shape[1:])).astype(np.float32)
        rows = network.forward(pts) @ c[i].T
        assert np.all(rows.min(axis=0) >= lower[i] - 1e-5)


def test_residual_mlp_is_bounded_in_matrix_mode():
    from lipverify.network.modules import ResidualBlock

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), ResidualBlock(
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3)).eval()
    network = build_network(module, (6,))
    adapter = LirpaBackend().adapter(network)
    assert adapter.bounded.conv_mode == "matrix"
    x = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    c = _robust_c(network.forward(x).argmax(axis=1), k=3)
    for norm, eps in ((Norm.LINF, 0.05), (Norm.L2, 0.1)):
        lower = adapter.row_bounds(Region.of(Perturbation.ball(norm, eps), x), c, Method.CROWN)
        rng = np.random.default_rng(1)
        d = rng.normal(size=(5, 500, 6))
        d = np.sign(d) if norm == Norm.LINF else d / np.linalg.norm(d, axis=2, keepdims=True)
        for i in range(5):
            rows = network.forward((x[i] + eps * d[i]).astype(np.float32)) @ c[i].T
            assert np.all(rows.min(axis=0) >= lower[i] - 1e-5)


def _pool_net(seed, padding, stride, batchnorm):
    """Issue 15, item 2: Conv - ReLU - AvgPool2d - Flatten - Linear on 2x5x5 inputs."""
    torch.manual_seed(seed)
    front = [nn.BatchNorm2d(2)] if batchnorm else []
    body = nn.Sequential(*front, nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2, stride=stride, padding=padding), nn.Flatten())
    width = body(torch.zeros(1, 2, 5, 5)).shape[1]
    module = nn.Sequential(*body, nn.Linear(width, 3)).eval()
    if batchnorm:
        with torch.no_grad():
            module[0].running_mean.uniform_(-1, 1)
            module[0].running_var.uniform_(0.5, 2)
    return module


def _pgd_margins(module, x, labels, norm, eps, steps=60, restarts=6):
    """Smallest margin PGD finds per input, in float64 (independent of lipverify)."""
    ref = copy.deepcopy(module).double()
    x0 = torch.tensor(x, dtype=torch.float64)
    lab = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(0)
    best = torch.full((len(x0),), np.inf, dtype=torch.float64)
    for _ in range(restarts):
        delta = (torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps
        if norm == Norm.L2:
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
        for _ in range(steps + 1):
            delta.requires_grad_(True)
            out = ref(x0 + delta)
            other = out.masked_fill(nn.functional.one_hot(lab, 3).bool(), -np.inf).max(1).values
            margin = out.gather(1, lab[:, None])[:, 0] - other
            best = torch.minimum(best, margin.detach())
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                if norm == Norm.LINF:
                    delta = (delta - eps / 15 * grad.sign()).clamp(-eps, eps)
                else:
                    g = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
                    delta = delta - eps / 8 * g
                    scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
                    delta = delta * scale.view(-1, 1, 1, 1)
    return best.numpy()


@pytest.mark.parametrize(("padding", "stride", "batchnorm"),
                         [(1, 2, False), (1, 2, True), (0, 1, False), (1, 1, True)])
@pytest.mark.parametrize("backend", [LirpaBackend, AlphaCrownBackend])
def test_average_pooling_with_padding_or_overlap_is_bounded_soundly(padding, stride, batchnorm,
                                                                    backend):
    # auto_LiRPA 0.3 back-substitutes average pooling as if stride == kernel and no padding:
    # 14 of 27 "verified" were wrong in the sweep. Pooling is now bounded as the exact
    # depthwise convolution of the layer view.
    wrong, verified = [], 0
    for seed in range(4):
        module = _pool_net(seed, padding, stride, batchnorm)
        network = build_network(module, (2, 5, 5))
        x = np.random.default_rng(seed).standard_normal((4, 2, 5, 5)).astype(np.float32)
        with torch.no_grad():
            labels = module(torch.as_tensor(x)).argmax(1).numpy()
        for norm, eps in ((Norm.LINF, 0.1), (Norm.L2, 0.3)):
            certs = backend().certify(network, Problem.robustness(
                x, labels, 3, Perturbation.ball(norm, eps)))
            found = _pgd_margins(module, x, labels, norm, eps)
            for i, cert in enumerate(certs):
                if cert.status == Status.VERIFIED:
                    verified += 1
                    assert cert.margin_lower <= found[i] + 1e-9
                    if found[i] < 0:
                        wrong.append((seed, norm, i, float(found[i])))
    assert not wrong
    assert verified > 0  # the check is not vacuous


@pytest.mark.parametrize("slope", [1.5, 3.0])
def test_concave_leaky_relu_is_refused_with_the_reason(slope):
    # Issue 15, item 3: auto_LiRPA relaxes LeakyReLU as if convex; with negative_slope > 1 the
    # function is concave and lirpa, alpha-crown and local verified a margin of -1.74.
    from lipverify.backends.local_lipschitz import LocalLipschitzBackend

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(slope), nn.Linear(5, 2)).eval()
    network = build_network(module, (3,))
    problem = Problem.robustness(np.zeros((1, 3), np.float32), [0], 2,
                                 Perturbation.ball(Norm.LINF, 0.1))
    for backend in (LirpaBackend(), AlphaCrownBackend(), LocalLipschitzBackend()):
        why = backend.supports(network, problem)
        assert why is not None and "concave" in why and "\n" not in why, backend.name
    # The convex slopes (negative ones included) are still bounded.
    for convex in (-0.5, 0.0, 0.3, 1.0):
        ok = build_network(nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(convex),
                                         nn.Linear(5, 2)).eval(), (3,))
        assert LirpaBackend().supports(ok, problem) is None, convex


def _without_float32_search(adapter):
    """`adapter` with its float32 slope search disabled (alpha-CROWN then runs in float64)."""
    def refuse():
        raise RuntimeError("float32 twin disabled by the test")
    adapter._search, adapter._search_failed, adapter._make_search = None, False, refuse
    return adapter


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 0.03), (Norm.L2, 0.5)])
def test_alpha_crown_searches_slopes_in_float32_and_bounds_in_float64(networks, data, norm, eps):
    """The float32 slope search is an optimisation only: its bounds stay at least CROWN's, below
    what PGD reaches, and within a hair of the all-float64 alpha-CROWN's."""
    x, y = data
    x, y = x[:32], y[:32]
    network = networks["digits_mlp"]
    c = _robust_c(y)
    region = Region.of(Perturbation.ball(norm, eps), x)
    options = LirpaOptions(alpha_iterations=20)
    mixed_adapter = LirpaAdapter(network, options, method=Method.ALPHA_CROWN)
    mixed = mixed_adapter.row_bounds(region, c, Method.ALPHA_CROWN)
    assert mixed_adapter.slope_search_dtype == torch.float32
    pure_adapter = _without_float32_search(LirpaAdapter(network, options))
    pure = pure_adapter.row_bounds(region, c, Method.ALPHA_CROWN)
    assert pure_adapter.slope_search_dtype == torch.float64
    crown = pure_adapter.row_bounds(region, c, Method.CROWN)
    assert np.all(mixed >= crown - 1e-9)
    assert np.abs(mixed - pure).mean() < 1e-2 * np.abs(pure).mean()
    assert abs(int((mixed.min(1) > 0).sum()) - int((pure.min(1) > 0).sum())) <= 1
    assert np.all(mixed.min(1) <= pgd(network, x, y, norm, eps) + 1e-5)


def test_alpha_crown_stays_sound_where_float32_overflows():
    """Weights of 1e22 overflow float32 in the second layer: the slopes searched there are
    garbage, and the float64 bound must still hold at sampled points of the box."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                           nn.Linear(8, 3))
    with torch.no_grad():
        module[0].weight.mul_(1e22)
        module[2].weight.mul_(1e22)
    network = load_network(module, (4,))
    x = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    c = np.eye(3)[None, :2].repeat(3, 0) - np.eye(3)[None, 2:3]
    eps = 0.01
    adapter = LirpaAdapter(network, LirpaOptions(alpha_iterations=5), method=Method.ALPHA_CROWN)
    lower = adapter.row_bounds(Region(x, Norm.LINF, np.full(3, eps)), c, Method.ALPHA_CROWN)
    assert np.all(np.isfinite(lower))
    double = copy.deepcopy(module).double()
    rng = np.random.default_rng(1)
    for i in range(3):
        pts = x[i] + rng.choice([-eps, eps], size=(2000, 4)) * rng.random((2000, 1))
        with torch.no_grad():
            out = double(torch.as_tensor(pts, dtype=torch.float64)).numpy()
        assert np.all(out @ c[i].T >= lower[i] - 1e-9 * np.abs(lower[i]))
