"""The normalised layer view that analytic backends read.

A network becomes a sequence of a few layer kinds, all on flattened-per-sample semantics defined by
their shapes. Weights are float64 CPU tensors so bounds are computed in double precision.

- `Dense`: `y = W x + b` on a flat vector.
- `Conv`: a 2-D convolution (stride, dilation, groups) after zero padding
  `(left, right, top, bottom)`; average pooling and explicit zero padding become this kind too.
- `Shift`: `y = x + t` (an isometry: input normalisation whose shift could not be folded).
- `Activation`: an elementwise nonlinearity with its slope interval, or GroupSort.
- `Reshape`: a change of shape only.
- `Residual`: `y = x + body(x)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812

Shape = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Dense:
    """`y = W x + b` on a flat vector."""

    weight: torch.Tensor
    bias: torch.Tensor
    in_shape: Shape
    out_shape: Shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch shaped `(B, *in_shape)`."""
        w = self.weight.to(x.dtype).to(x.device)
        y = x.reshape(x.shape[0], -1) @ w.T + self.bias.to(x.dtype).to(x.device)
        return y.reshape((x.shape[0], *self.out_shape))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part (no bias)."""
        w = self.weight.to(x.dtype).to(x.device)
        return (x.reshape(x.shape[0], -1) @ w.T).reshape((x.shape[0], *self.out_shape))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The transpose of the linear part."""
        w = self.weight.to(y.dtype).to(y.device)
        return (y.reshape(y.shape[0], -1) @ w).reshape((y.shape[0], *self.in_shape))


@dataclass(frozen=True, eq=False)
class Conv:
    """2-D convolution after zero padding `(left, right, top, bottom)`."""

    weight: torch.Tensor
    bias: torch.Tensor
    in_shape: Shape
    out_shape: Shape
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part (no bias)."""
        x = x.reshape((x.shape[0], *self.in_shape))
        if any(self.padding):
            x = F.pad(x, self.padding)
        w = self.weight.to(x.dtype).to(x.device)
        return F.conv2d(x, w, None, self.stride, 0, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch shaped `(B, *in_shape)`."""
        return self.linear(x) + self.bias.to(x.dtype).to(x.device).view(1, -1, 1, 1)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The transpose of the linear part, computed exactly through autograd."""
        y = y.reshape((y.shape[0], *self.out_shape))
        x = torch.zeros((y.shape[0], *self.in_shape), dtype=y.dtype, device=y.device,
                        requires_grad=True)
        with torch.enable_grad():
            out = self.linear(x)
            (grad,) = torch.autograd.grad(out, x, y)
        return grad.detach()

    def matrix(self) -> torch.Tensor:
        """The dense matrix of the linear part (only for small layers)."""
        n = math.prod(self.in_shape)
        eye = torch.eye(n, dtype=torch.float64).reshape((n, *self.in_shape))
        return self.linear(eye).reshape(n, -1).T


@dataclass(frozen=True, eq=False)
class Shift:
    """`y = x + t`: a translation, Lipschitz constant exactly 1."""

    shift: torch.Tensor
    in_shape: Shape

    @property
    def out_shape(self) -> Shape:
        """Same as the input shape."""
        return self.in_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch."""
        return x + self.shift.to(x.dtype).to(x.device)


ACTIVATION_SLOPES: dict[str, tuple[float, float]] = {
    "relu": (0.0, 1.0),
    "tanh": (0.0, 1.0),
    "sigmoid": (0.0, 0.25),
    "groupsort": (0.0, 1.0),
}


@dataclass(frozen=True, eq=False)
class Activation:
    """Elementwise activation with slope interval `[slope_lo, slope_hi]`, or GroupSort.

    `kind` is one of relu, leaky_relu, tanh, sigmoid, groupsort. `param` is the negative slope
    of leaky_relu or the group size of groupsort.
    """

    kind: str
    in_shape: Shape
    param: float = 0.0

    @property
    def out_shape(self) -> Shape:
        """Same as the input shape."""
        return self.in_shape

    @property
    def slopes(self) -> tuple[float, float]:
        """The interval every difference quotient of the activation lies in."""
        if self.kind == "leaky_relu":
            return (min(self.param, 1.0), max(self.param, 1.0))
        return ACTIVATION_SLOPES[self.kind]

    @property
    def elementwise(self) -> bool:
        """False for GroupSort, which mixes coordinates."""
        return self.kind != "groupsort"

    @property
    def lipschitz(self) -> float:
        """Lipschitz constant of the activation in L2 (and L-infinity)."""
        lo, hi = self.slopes
        return max(abs(lo), abs(hi)) if self.elementwise else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch."""
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind == "leaky_relu":
            return F.leaky_relu(x, self.param)
        if self.kind == "tanh":
            return torch.tanh(x)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        group = int(self.param)
        flat = x.reshape(x.shape[0], -1, group)
        return flat.sort(dim=-1).values.reshape(x.shape)


@dataclass(frozen=True, eq=False)
class Reshape:
    """A change of shape only."""

    in_shape: Shape
    out_shape: Shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch."""
        return x.reshape((x.shape[0], *self.out_shape))


@dataclass(frozen=True, eq=False)
class Residual:
    """`y = x + body(x)`."""

    body: tuple[Layer, ...]
    in_shape: Shape = field(default=())

    @property
    def out_shape(self) -> Shape:
        """Same as the input shape."""
        return self.in_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch."""
        return x + run_layers(self.body, x)


Layer = Dense | Conv | Shift | Activation | Reshape | Residual
Affine = Dense | Conv


def run_layers(layers: tuple[Layer, ...], x: torch.Tensor) -> torch.Tensor:
    """Apply a layer sequence to a batch."""
    for layer in layers:
        x = layer.forward(x)
    return x


def is_feedforward(layers: tuple[Layer, ...]) -> bool:
    """True when the layers alternate affine maps and elementwise activations (no residuals).

    Shifts and reshapes may appear anywhere; this is the shape LipSDP and bound propagation need.
    """
    return all(not isinstance(layer, Residual) and
               not (isinstance(layer, Activation) and not layer.elementwise) for layer in layers)
