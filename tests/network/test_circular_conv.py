"""Circularly padded convolutions (Cayley / FFT-orthogonal layers) as their exact matrices."""

import numpy as np
import pytest
import torch
from torch import nn

import lipverify
from lipverify.errors import UnsupportedLayerError
from lipverify.network.extract import extract_layers
from lipverify.network.layers import Dense, Reshape


def _cayley_kernel(channels: int, size: int, seed: int) -> np.ndarray:
    """An orthogonal circular convolution by the Cayley transform of a skew-Hermitian matrix at
    every frequency (Trockman & Kolter, ICLR 2021), built here with numpy's FFT."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, channels, size, size))
    a = np.fft.fft2(w).transpose(2, 3, 0, 1)  # (size, size, c, c)
    v = a - np.conj(np.swapaxes(a, -1, -2))
    eye = np.eye(channels)
    q = (eye - v) @ np.linalg.inv(eye + v)
    kernel = np.fft.ifft2(q.transpose(2, 3, 0, 1))
    assert np.abs(kernel.imag).max() < 1e-10
    return kernel.real


def _circular(channels: int, out: int, size: int, kernel: int, seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(channels, out, kernel, padding=kernel // 2, padding_mode="circular", **kw)


def _matrix(module: nn.Module, shape: tuple[int, ...]) -> np.ndarray:
    """The exact matrix of a linear module, column by column (independent of extract.py)."""
    n = int(np.prod(shape))
    with torch.no_grad():
        cols = [module.double()(torch.eye(n, dtype=torch.float64)[j].reshape(1, *shape)).ravel()
                - module.double()(torch.zeros(1, *shape, dtype=torch.float64)).ravel()
                for j in range(n)]
    module.float()
    return torch.stack(cols, dim=1).numpy()


@pytest.mark.parametrize("kw", [{}, {"stride": 2}, {"groups": 2}, {"dilation": 2}])
def test_a_circular_conv_becomes_its_exact_matrix(kw):
    conv = _circular(4, 6, 7, 3, **kw)
    layer, reshape = extract_layers(conv, (4, 7, 7))
    assert isinstance(layer, Dense) and isinstance(reshape, Reshape)
    np.testing.assert_array_equal(layer.weight.numpy(), _matrix(conv, (4, 7, 7)))
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = conv.double()(x)
    conv.float()
    np.testing.assert_allclose(reshape.forward(layer.forward(x)).numpy(), expected.numpy(),
                               rtol=1e-12,
                               atol=1e-12)


def test_a_cayley_convolution_certifies_at_its_guaranteed_norm_of_one():
    size, channels = 5, 3
    conv = nn.Conv2d(channels, channels, size, padding=size // 2, padding_mode="circular",
                     bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.as_tensor(_cayley_kernel(channels, size, 0)))
    matrix = _matrix(conv, (channels, size, size))
    exact = np.linalg.svd(matrix, compute_uv=False)
    assert abs(exact.max() - 1) < 1e-6 and abs(exact.min() - 1) < 1e-6  # orthogonal
    net = nn.Sequential(conv, nn.Flatten())
    report = lipverify.lipschitz(net, ["spectral"], input_shape=(channels, size, size))
    [bound] = report.bounds
    assert bound.sound and exact.max() <= bound.value <= 1 + 1e-5
    assert report.lower_bound <= bound.value


def test_a_circular_convnet_is_certified_soundly_by_every_backend():
    """A ReLU convnet with circular convolutions: on every input, what a backend verifies the
    attack does not break, and spectral's bound is at least the largest sampled gradient."""
    from lipverify.backends.registry import BackendRegistry
    from lipverify.network.load import load_network
    from lipverify.types import Perturbation, Problem, Status

    torch.manual_seed(0)
    net = nn.Sequential(_circular(2, 4, 6, 3), nn.ReLU(), _circular(4, 4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(144, 3)).eval()
    network = load_network(net, (2, 6, 6))
    assert network.layers is not None
    x = np.random.default_rng(0).normal(size=(20, 2, 6, 6)).astype(np.float32)
    y = network.forward(x).argmax(1)
    registry = BackendRegistry.from_entry_points()
    names = [n for n in ("spectral", "lirpa", "l2prop", "local") if n in
             registry.available_names()]
    for norm, eps in ((2, 0.2), ("inf", 0.02)):
        problem = Problem.robustness(x, y, 3, Perturbation.ball(norm, eps))
        broken = {i for i, c in enumerate(registry.create("attack").certify(network, problem))
                  if c.status == Status.FALSIFIED}
        verified = set()
        for name in names:
            backend = registry.create(name)
            if backend.supports(network, problem) is not None:
                continue
            certs = backend.certify(network, problem)
            ok = {i for i, c in enumerate(certs) if c.status == Status.VERIFIED}
            assert not ok & broken, name
            verified |= ok
        assert verified and broken
    report = lipverify.lipschitz(net, ["spectral"], input_shape=(2, 6, 6))
    assert report.bounds[0].value >= report.lower_bound > 0


def test_other_padding_modes_and_oversized_kernels_are_refused_by_name():
    with pytest.raises(UnsupportedLayerError, match="padding_mode='reflect'"):
        extract_layers(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (2, 5, 5))
    with pytest.raises(UnsupportedLayerError, match="spans 7x7"):
        extract_layers(nn.Conv2d(2, 2, 7, padding=3, padding_mode="circular"), (2, 5, 5))


def _soc_kernel(channels: int, k: int, terms: int, seed: int) -> np.ndarray:
    """The kernel of a skew orthogonal convolution (Singla & Feizi, ICML 2021), `exp(L)` with
    `L = conv(K) - conv(K)^T` summed to `terms` Taylor terms, as one plain correlation kernel:
    read off as the flipped impulse responses on a grid large enough to have no boundary."""
    torch.manual_seed(seed)
    weight = 0.3 * torch.randn(channels, channels, k, k, dtype=torch.float64) / k
    pad = k // 2
    reach = terms * pad
    size = 2 * reach + 1
    delta = torch.zeros(channels, channels, size, size, dtype=torch.float64)
    delta[torch.arange(channels), torch.arange(channels), reach, reach] = 1.0
    term, total = delta, delta.clone()
    for j in range(1, terms + 1):
        term = (torch.nn.functional.conv2d(term, weight, padding=pad)
                - torch.nn.functional.conv_transpose2d(term, weight, padding=pad)) / j
        total = total + term
    # total[c, o] is the response of output channel o to an impulse on input channel c
    return total.permute(1, 0, 2, 3).flip(2, 3).numpy()


def test_a_skew_orthogonal_convolution_exported_as_a_plain_conv_certifies_near_one():
    channels, k, terms = 2, 3, 8
    kernel = _soc_kernel(channels, k, terms, 0)
    size = kernel.shape[-1]
    conv = nn.Conv2d(channels, channels, size, padding=size // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.as_tensor(kernel))
    shape = (channels, 8, 8)
    exact = np.linalg.svd(_matrix(conv, shape), compute_uv=False).max()
    report = lipverify.lipschitz(nn.Sequential(conv, nn.Flatten()), ["spectral"],
                                 input_shape=shape)
    [bound] = report.bounds
    assert bound.sound and exact <= bound.value <= 1 + 1e-5
    # the near-orthogonal bound, from the kernel alone, is as tight as the construction says
    assert exact <= bound.details["layers"][0]["candidates"]["orthogonal"] <= 1 + 1e-5
