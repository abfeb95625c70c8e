"""A feed-forward ReLU network as a chain of affine blocks separated by ReLU layers.

The layer view (`lipverify.network.layers`) is regrouped into `Chain.blocks`: block `k` is the
composition of the linear layers (Dense, Conv, Shift, Reshape) between ReLU `k - 1` and ReLU `k`,
an affine map `z_k = T_k(a_{k-1})`; the last block maps the last ReLU's output to the logits.
Every map is exact (float64 weights); nothing here is a relaxation.

Backward propagation needs, for a batch of coefficient tensors `A` on a block's output, the
coefficients `T_k^* A` on its input (the adjoint of the linear part) and the constant `<A, T_k(0)>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from lipverify.errors import UnsupportedLayerError
from lipverify.network.layers import Activation, Conv, Dense, Layer, Reshape, Shape, Shift

# Backends that still run when the chain view does not fit.
OTHER_BACKENDS = ("attack", "lirpa", "spectral")

LinearLayer = Dense | Conv | Shift | Reshape


def conv_adjoint(conv: Conv, y: torch.Tensor) -> torch.Tensor:
    """The transpose of `conv.linear` applied to a batch `y` shaped `(N, *conv.out_shape)`."""
    cin, h, w = conv.in_shape
    left, right, top, bottom = conv.padding
    hp, wp = h + top + bottom, w + left + right
    kh, kw = conv.weight.shape[2:]
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    ho, wo = conv.out_shape[1:]
    out_pad = (hp - ((ho - 1) * sh + dh * (kh - 1) + 1), wp - ((wo - 1) * sw + dw * (kw - 1) + 1))
    weight = conv.weight.to(y.dtype).to(y.device)
    x = F.conv_transpose2d(y.reshape((-1, *conv.out_shape)), weight, None, conv.stride,
                           0, out_pad, conv.groups, conv.dilation)
    return x[:, :, top:top + h, left:left + w]


def layer_adjoint(layer: LinearLayer, a: torch.Tensor) -> torch.Tensor:
    """Coefficients on the layer's input from coefficients `a` `(N, *out_shape)` on its output."""
    if isinstance(layer, Dense):
        w = layer.weight.to(a.dtype).to(a.device)
        return (a.reshape(a.shape[0], -1) @ w).reshape((a.shape[0], *layer.in_shape))
    if isinstance(layer, Conv):
        return conv_adjoint(layer, a)
    if isinstance(layer, Reshape):
        return a.reshape((a.shape[0], *layer.in_shape))
    return a  # Shift: the identity on coefficients


def layer_constant(layer: LinearLayer, a: torch.Tensor) -> torch.Tensor:
    """`<a, layer(0)>` per row of `a` `(N, *out_shape)`: the bias the layer adds to `a . y`."""
    if isinstance(layer, Dense):
        return a.reshape(a.shape[0], -1) @ layer.bias.to(a.dtype).to(a.device)
    if isinstance(layer, Conv):
        per_channel = a.reshape((a.shape[0], *layer.out_shape)).sum(dim=(2, 3))
        return per_channel @ layer.bias.to(a.dtype).to(a.device)
    if isinstance(layer, Shift):
        return a.reshape(a.shape[0], -1) @ layer.shift.to(a.dtype).to(a.device).reshape(-1)
    return torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)


@dataclass(frozen=True, eq=False)
class Block:
    """An affine map made of linear layers: `z = T(a)` from `in_shape` to `out_shape`."""

    layers: tuple[LinearLayer, ...]
    in_shape: Shape
    out_shape: Shape

    @property
    def in_size(self) -> int:
        """Number of input coordinates."""
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        """Number of output coordinates."""
        return math.prod(self.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch `(B, *in_shape)`."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(T^* a, <a, T(0)>)` for coefficients `a` `(N, *out_shape)` on the output.

        Uses `a . T(x) = (T^* a) . x + a . T(0)`, exact for affine `T`.
        """
        const = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for layer in reversed(self.layers):
            const = const + layer_constant(layer, a)
            a = layer_adjoint(layer, a)
        return a, const

    def affine_layers(self) -> tuple[Dense | Conv, ...]:
        """The Dense and Conv layers of the block, in order."""
        return tuple(layer for layer in self.layers if isinstance(layer, (Dense, Conv)))


@dataclass(frozen=True, eq=False)
class Chain:
    """`f = T_K o relu o T_{K-1} o ... o relu o T_0`: `K` ReLU layers between `K + 1` blocks."""

    blocks: tuple[Block, ...]
    input_shape: Shape

    @property
    def num_relus(self) -> int:
        """Number of ReLU layers."""
        return len(self.blocks) - 1

    def centres(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pre-activations `z_k(x)` of every ReLU layer and the outputs, flattened per sample."""
        out = []
        a = x.reshape((x.shape[0], *self.input_shape))
        for k, block in enumerate(self.blocks):
            z = block.forward(a)
            out.append(z.reshape(z.shape[0], -1))
            if k < self.num_relus:
                a = torch.relu(z)
        return out


def build_chain(layers: tuple[Layer, ...], input_shape: Shape) -> Chain:
    """Group a layer view into blocks and ReLUs, or raise `UnsupportedLayerError`."""
    blocks: list[Block] = []
    current: list[LinearLayer] = []
    shape = tuple(input_shape)
    start = shape
    for i, layer in enumerate(layers):
        if isinstance(layer, Activation):
            if layer.kind != "relu":
                raise UnsupportedLayerError(f"layer {i} ({layer.kind} activation; l2prop "
                                            "handles ReLU only)", OTHER_BACKENDS)
            blocks.append(Block(tuple(current), start, shape))
            current, start = [], shape
        elif isinstance(layer, (Dense, Conv, Shift, Reshape)):
            if tuple(layer.in_shape) != shape and math.prod(layer.in_shape) != math.prod(shape):
                raise UnsupportedLayerError(f"layer {i} (shape {layer.in_shape} after {shape})",
                                            OTHER_BACKENDS)
            current.append(layer)
            shape = tuple(layer.out_shape)
        else:
            raise UnsupportedLayerError(f"layer {i} ({type(layer).__name__})", OTHER_BACKENDS)
    blocks.append(Block(tuple(current), start, shape))
    return Chain(tuple(blocks), tuple(input_shape))
