"""Build a clean float32 `nn.Sequential` from the normalised layer view.

Bound propagation libraries trace a module's forward pass; some modules (onnx2torch
`GraphModule`s, custom containers) do not trace, while the layer view always describes the same
function with a handful of layer kinds. `layers_to_module` turns that view back into plain torch
modules chosen so that auto_LiRPA 0.3 can bound them:

- `Dense` becomes `nn.Linear` (after a flatten when its input is not flat);
- `Conv` becomes `nn.Conv2d`, with its padding inside the convolution when symmetric and an
  `nn.ZeroPad2d` before it only when asymmetric (auto_LiRPA 0.3 cannot bound `ZeroPad2d`, so
  `has_asymmetric_padding` lets a backend say so up front);
- `Shift` becomes `AddConstant` and `Reshape` becomes `nn.Flatten` or `View` (0.3 rejects
  `nn.Unflatten`); `Residual` becomes `ResidualBlock`, activations their torch modules.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipverify.errors import UnsupportedLayerError
from lipverify.network.layers import (
    Activation,
    Conv,
    Dense,
    Layer,
    Reshape,
    Residual,
    Shape,
    Shift,
)
from lipverify.network.modules import GroupSort, ResidualBlock


class AddConstant(nn.Module):
    """`x + shift` with a constant `shift` of the sample's shape."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().to(torch.float32).clone().unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Translate a batch."""
        return x + self.shift


class View(nn.Module):
    """Reshape each sample to `shape` (batch dimension kept)."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape a batch (-1 for the batch: traced graphs then keep it free)."""
        return x.reshape(-1, *self.shape)

    def extra_repr(self) -> str:
        """The target shape."""
        return f"shape={self.shape}"


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone()


def _reshape_module(src: Shape, dst: Shape) -> nn.Module:
    if len(dst) == 1 and math.prod(src) == dst[0]:
        return nn.Flatten()
    return View(dst)


def _dense(layer: Dense) -> nn.Linear:
    out_features, in_features = layer.weight.shape
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(_f32(layer.weight))
        linear.bias.copy_(_f32(layer.bias))
    return linear


def _conv(layer: Conv) -> list[nn.Module]:
    left, right, top, bottom = layer.padding
    out_c, in_per_group, kh, kw = layer.weight.shape
    symmetric = left == right and top == bottom
    conv = nn.Conv2d(in_per_group * layer.groups, out_c, (kh, kw), stride=layer.stride,
                     padding=(top, left) if symmetric else 0, dilation=layer.dilation,
                     groups=layer.groups)
    with torch.no_grad():
        conv.weight.copy_(_f32(layer.weight))
        conv.bias.copy_(_f32(layer.bias))
    if symmetric:
        return [conv]
    return [nn.ZeroPad2d((left, right, top, bottom)), conv]


def _activation(layer: Activation) -> nn.Module:
    match layer.kind:
        case "relu":
            return nn.ReLU()
        case "leaky_relu":
            return nn.LeakyReLU(layer.param)
        case "tanh":
            return nn.Tanh()
        case "sigmoid":
            return nn.Sigmoid()
        case "groupsort":
            return GroupSort(int(layer.param))
    raise UnsupportedLayerError(f"activation {layer.kind!r}", ())


def _modules(layers: tuple[Layer, ...], shape: Shape) -> tuple[list[nn.Module], Shape]:
    """Torch modules computing `layers` on samples of `shape`, and the output shape."""
    out: list[nn.Module] = []
    for layer in layers:
        in_shape = tuple(layer.in_shape)
        if isinstance(layer, Dense):
            in_shape = (math.prod(in_shape),)  # a Dense layer reads the flattened sample
        if isinstance(layer, Reshape):
            if tuple(layer.out_shape) != tuple(shape):
                out.append(_reshape_module(shape, tuple(layer.out_shape)))
            shape = tuple(layer.out_shape)
            continue
        if tuple(shape) != in_shape:
            out.append(_reshape_module(shape, in_shape))
        match layer:
            case Dense():
                out.append(_dense(layer))
            case Conv():
                out.extend(_conv(layer))
            case Shift():
                out.append(AddConstant(layer.shift.reshape(in_shape)))
            case Activation():
                out.append(_activation(layer))
            case Residual():
                body, body_shape = _modules(layer.body, in_shape)
                if body_shape != in_shape:
                    body.append(_reshape_module(body_shape, in_shape))
                out.append(ResidualBlock(*body))
        shape = tuple(layer.out_shape)
    return out, shape


def layers_to_module(layers: tuple[Layer, ...], input_shape: Shape | None = None) -> nn.Sequential:
    """A float32 `nn.Sequential` (eval mode, CPU) computing the same function as `layers`.

    Args:
        layers: The normalised layer view.
        input_shape: Shape of one sample (default: the first layer's input shape).

    Returns:
        The module; it maps a batch shaped `(B, *input_shape)` to `(B, *last.out_shape)`.
    """
    if not layers:
        raise UnsupportedLayerError("an empty layer sequence", ())
    shape = tuple(input_shape) if input_shape is not None else tuple(layers[0].in_shape)
    modules, _ = _modules(tuple(layers), shape)
    return nn.Sequential(*modules).eval()


def has_asymmetric_padding(layers: tuple[Layer, ...]) -> bool:
    """True when some convolution pads unevenly (it becomes an `nn.ZeroPad2d`)."""
    for layer in layers:
        if isinstance(layer, Residual) and has_asymmetric_padding(layer.body):
            return True
        if isinstance(layer, Conv):
            left, right, top, bottom = layer.padding
            if left != right or top != bottom:
                return True
    return False


def conv_after_reshape(layers: tuple[Layer, ...]) -> bool:
    """True when a convolution follows a reshape (auto_LiRPA then needs `conv_mode='matrix'`).

    A reshape is a `Reshape` layer, a `Dense` layer reading a non-flat sample, or any change of
    shape between consecutive layers (where `layers_to_module` inserts a view).
    """
    return _conv_after_reshape(tuple(layers), False, None)[0]


def _conv_after_reshape(layers: tuple[Layer, ...], seen: bool,
                        shape: Shape | None) -> tuple[bool, bool]:
    for layer in layers:
        if shape is not None and tuple(layer.in_shape) != tuple(shape):
            seen = True
        if isinstance(layer, Residual):
            found, seen = _conv_after_reshape(layer.body, seen, tuple(layer.in_shape))
            if found:
                return True, seen
        elif isinstance(layer, Reshape) or (isinstance(layer, Dense) and len(layer.in_shape) > 1):
            seen = True
        elif isinstance(layer, Conv) and seen:
            return True, seen
        shape = tuple(layer.out_shape)
    return False, seen


def needs_matrix_mode(layers: tuple[Layer, ...]) -> bool:
    """True when auto_LiRPA 0.3 must bound with `conv_mode='matrix'`: a convolution after a
    reshape, or a residual sum of flat features (its patches mode takes every sum for an image).
    """
    if conv_after_reshape(layers):
        return True
    return any(isinstance(layer, Residual) and (len(layer.in_shape) != 3 or
                                                needs_matrix_mode(layer.body))
               for layer in layers)
