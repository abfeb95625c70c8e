"""Lipschitz-by-construction building blocks and a small 1-Lipschitz convnet for 8x8 digits.

- `BCOPConv2d`: block convolution orthogonal parametrisation (Li, Haque, Anil, Lucas, Grosse,
  Jacobsen, "Preventing gradient attenuation in Lipschitz constrained convolutional networks",
  NeurIPS 2019). A `k x k` kernel whose symbol is
  `H (P_1 + (I - P_1) z_1) ... (P_{k-1} + (I - P_{k-1}) z_1) (Q_1 + (I - Q_1) z_2) ...`
  with `H` orthogonal and `P_j`, `Q_j` symmetric projectors: unitary on the unit torus, so the
  correlation is an isometry of the infinite grid, and with zero padding (a restriction) its
  norm is at most 1.
- `OrthogonalDownsample`: a stride-2, `2 x 2` convolution from `c` to `4 c` channels whose
  weight is an orthogonal `4c x 4c` matrix on each 2x2 block (invertible downsampling): an
  isometry on even-sized inputs.
- `OrthogonalLinear`: `nn.Linear` with orthonormal rows or columns.

Orthogonal matrices come from the matrix exponential of a skew-symmetric matrix, so all three
train with plain gradient descent and stay orthogonal to float precision. The modules are
`nn.Conv2d` / `nn.Linear` subclasses whose `weight` is computed, so lipverify's layer view reads
them directly; `export_plain` turns a model into plain modules (plain state dicts).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipverify.network.modules import MaxMin

INPUT_SHAPE = (1, 8, 8)  # of `digits_orthogonal_cnn` (read by `--arch ...:digits_orthogonal_cnn`)


def orthogonal_matrix(raw: torch.Tensor) -> torch.Tensor:
    """`exp(A - A^T)`: an orthogonal matrix for any square `raw` (differentiable)."""
    return torch.linalg.matrix_exp(raw - raw.mT)


def _float32_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64-computed weight rounded to float32, then given the parameters' dtype.

    The module then computes the same function whether it runs in float32 or float64 (a weight
    recomputed in float64 would differ from the float32 one by ~1e-7: lipverify checks its layer
    view against the module run in float64 and would drop it).
    """
    return weight.to(torch.float32).to(dtype)


def _times_block(poly: torch.Tensor, projector: torch.Tensor, axis: int) -> torch.Tensor:
    """`poly(z) (P + (I - P) z_axis)` for a matrix polynomial `poly[a, b] ~ z_1^a z_2^b`."""
    eye = torch.eye(projector.shape[0], dtype=projector.dtype, device=projector.device)
    shape = list(poly.shape)
    shape[axis] += 1
    out = poly.new_zeros(shape)
    lead = [slice(None)] * 2
    low, high = list(lead), list(lead)
    low[axis], high[axis] = slice(0, -1), slice(1, None)
    out[tuple(low)] += poly @ projector
    out[tuple(high)] += poly @ (eye - projector)
    return out


def bcop_kernel(raw: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The `(c, c, k, k)` BCOP kernel from `raw` of shape `(2k - 1, c, c)`.

    `raw[0]` gives `H`, `raw[1:k]` the projectors along the height, `raw[k:]` along the width
    (each the projector onto the first `c // 2` columns of an orthogonal matrix). The
    correlation kernel `W[:, :, a, b]` is the coefficient of `z_1^a z_2^b` of the symbol.
    """
    c = raw.shape[-1]
    poly = orthogonal_matrix(raw[0])[None, None]
    for j in range(1, 2 * kernel_size - 1):
        q = orthogonal_matrix(raw[j])[:, : max(c // 2, 1)]
        poly = _times_block(poly, q @ q.mT, 0 if j < kernel_size else 1)
    return poly.permute(2, 3, 0, 1)


class _BCOPWeight(nn.Module):
    """Parametrisation: raw `(2k - 1, c, c)` -> BCOP kernel `(c, c, k, k)`."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """The kernel."""
        return _float32_weight(bcop_kernel(raw.double(), self.kernel_size), raw.dtype)


class _DownsampleWeight(nn.Module):
    """Parametrisation: raw `(4c, 4c)` -> `(4c, c, 2, 2)` orthogonal block weight."""

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """The weight."""
        n = raw.shape[0]
        return _float32_weight(orthogonal_matrix(raw.double()).reshape(n, n // 4, 2, 2),
                               raw.dtype)


class _LinearWeight(nn.Module):
    """Parametrisation: raw `(n, n)` -> the top-left `(out, in)` block of `exp(A - A^T)`."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.shape = (out_features, in_features)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """The weight (orthonormal rows or columns)."""
        q = orthogonal_matrix(raw.double())[: self.shape[0], : self.shape[1]]
        return _float32_weight(q, raw.dtype)


def _parametrise(module: nn.Module, raw_shape: tuple[int, ...], weight: nn.Module,
                 generator: torch.Generator | None) -> None:
    del module.weight
    module.weight = nn.Parameter(0.1 * torch.randn(raw_shape, generator=generator))
    parametrize.register_parametrization(module, "weight", weight, unsafe=True)
    with torch.no_grad():  # torch drew it from the global generator: seeded models need zeros
        module.bias.zero_()


class BCOPConv2d(nn.Conv2d):
    """An orthogonal `k x k` convolution (odd `k`, 'same' zero padding, stride 1)."""

    def __init__(self, channels: int, kernel_size: int = 3,
                 generator: torch.Generator | None = None) -> None:
        if kernel_size % 2 != 1:
            raise ValueError("BCOPConv2d needs an odd kernel size (symmetric 'same' padding)")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2)
        _parametrise(self, (2 * kernel_size - 1, channels, channels), _BCOPWeight(kernel_size),
                     generator)


class OrthogonalDownsample(nn.Conv2d):
    """Invertible downsampling: `c x H x W -> 4c x H/2 x W/2`, orthogonal on every 2x2 block."""

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__(channels, 4 * channels, 2, stride=2)
        _parametrise(self, (4 * channels, 4 * channels), _DownsampleWeight(), generator)


class OrthogonalLinear(nn.Linear):
    """`nn.Linear` with an orthogonal weight (orthonormal rows when `out < in`, else columns).

    Like `torch.nn.utils.parametrizations.orthogonal` (which lipverify reads as well), with the
    weight computed in float64 and rounded to float32 like the other layers here
    (`_float32_weight`).
    """

    def __init__(self, in_features: int, out_features: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(in_features, out_features)
        n = max(in_features, out_features)
        _parametrise(self, (n, n), _LinearWeight(out_features, in_features), generator)


def digits_orthogonal_cnn(seed: int = 0) -> nn.Sequential:
    """1x8x8 -> 10, 1-Lipschitz in L2 by construction (MaxMin activations)."""
    gen = torch.Generator().manual_seed(seed)
    return nn.Sequential(
        OrthogonalDownsample(1, gen),          # 4 x 4 x 4
        BCOPConv2d(4, 3, gen), MaxMin(),
        OrthogonalDownsample(4, gen),          # 16 x 2 x 2
        BCOPConv2d(16, 3, gen), MaxMin(),
        nn.Flatten(),
        OrthogonalLinear(64, 10, gen),
    )


def export_plain(model: nn.Module) -> nn.Module:
    """A copy with every parametrised `Conv2d` / `Linear` replaced by a plain one (same weights).

    Plain modules have plain state dicts (`weight`, `bias`), loadable into an architecture
    with ordinary layers of the same shapes.
    """
    out = copy.deepcopy(model)
    for name, child in list(out.named_children()):
        if parametrize.is_parametrized(child) and isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(out, name, _plain(child))
        else:
            setattr(out, name, export_plain(child))
    return out


def _plain(module: nn.Conv2d | nn.Linear) -> nn.Module:
    with torch.no_grad():
        weight = module.weight.detach().clone()
        if isinstance(module, nn.Linear):
            plain = nn.Linear(module.in_features, module.out_features, module.bias is not None)
        else:
            plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                              module.stride, module.padding, module.dilation, module.groups,
                              module.bias is not None)
        plain.weight.copy_(weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias.detach())
    return plain


def train_digits(model: nn.Module, epochs: int = 8, temperature: float = 32.0, lr: float = 0.02,
                 seed: int = 0) -> float:
    """A short Adam run on scikit-learn's digits; returns the training accuracy.

    The logits of a 1-Lipschitz network are small, so the cross-entropy sees them scaled by
    `temperature` (which changes no prediction and no certificate of `model` itself).
    """
    from lipverify.data import digits_split

    x, y, _, _ = digits_split()
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(temperature * model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
