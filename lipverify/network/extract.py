"""Turn a torch module into the normalised layer view.

Walks `nn.Sequential` containers (nested too), maps each known module to a layer, then folds
diagonal affine maps (BatchNorm, input normalisation) into a neighbouring affine layer where the
result computes exactly the same function, and explicit zero padding into the next convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from lipverify.network.modules import GroupSort, Normalize, ResidualBlock

# Backends that run on the module itself and so survive an unsupported layer.
MODULE_BACKENDS = ("attack", "lirpa")
# A circularly padded convolution becomes its exact matrix up to this many entries (128 MiB).
CIRCULAR_MAX_ENTRIES = 2 ** 24


@dataclass(frozen=True, eq=False)
class Diagonal:
    """`y = scale * x + shift`, per channel (dim 1) or per feature: transient, folded away."""

    scale: torch.Tensor
    shift: torch.Tensor
    in_shape: Shape

    @property
    def out_shape(self) -> Shape:
        """Same as the input shape."""
        return self.in_shape

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-channel vector to the whole input shape."""
        if len(self.in_shape) == 1 or t.numel() == math.prod(self.in_shape):
            return t.reshape(self.in_shape)
        view = (-1,) + (1,) * (len(self.in_shape) - 1)
        return t.view(view).expand(self.in_shape)

    @classmethod
    def of(cls, scale: torch.Tensor, shift: torch.Tensor, shape: Shape) -> Diagonal:
        """From whole-shape `scale` and `shift`, kept per channel when constant over space."""
        shape = tuple(shape)

        def compact(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(shape)
            if len(shape) == 3 and torch.equal(t, t[:, :1, :1].expand(shape)):
                return t[:, 0, 0].clone()
            return t.clone()

        return cls(compact(scale), compact(shift), shape)

    def then(self, other: Diagonal) -> Diagonal:
        """`other(self(x))` as one diagonal map."""
        scale = self.full(self.scale) * other.full(other.scale)
        shift = self.full(self.shift) * other.full(other.scale) + other.full(other.shift)
        return Diagonal.of(scale, shift, self.in_shape)

    def reshaped(self, shape: Shape) -> Diagonal:
        """The same map on the input reshaped to `shape` (as seen after a `Reshape`)."""
        return Diagonal.of(self.full(self.scale).reshape(shape),
                           self.full(self.shift).reshape(shape), shape)


def _d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).clone()


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_out(size: int, k: int, s: int, d: int, p_total: int) -> int:
    return (size + p_total - d * (k - 1) - 1) // s + 1


def _circular_conv2d(m: nn.Conv2d, shape: Shape, name: str) -> tuple[Dense, Reshape]:
    """A circularly padded convolution (Cayley / FFT-orthogonal convs) as its exact matrix.

    Exact because no two taps of one output meet on one input pixel when the dilated kernel
    spans at most the image (a window of at most `n` consecutive indices mod `n` has distinct
    members): every matrix entry is one weight, copied, not a rounded sum.
    """
    c, h, w = shape
    (kh, kw), (dh, dw) = m.kernel_size, _pair(m.dilation)
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if span_h > h or span_w > w:
        raise UnsupportedLayerError(f"{name} (circular Conv2d whose kernel spans {span_h}x"
                                    f"{span_w}, more than the {h}x{w} image)", MODULE_BACKENDS)
    double = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                       m.dilation, m.groups, bias=False, padding_mode="circular").double()
    with torch.no_grad():
        double.weight.copy_(_d(m.weight))
        out = tuple(double(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:])
        n_in, n_out = c * h * w, math.prod(out)
        if n_in * n_out > CIRCULAR_MAX_ENTRIES:
            raise UnsupportedLayerError(f"{name} (circular Conv2d: its exact {n_out}x{n_in} "
                                        f"matrix exceeds {CIRCULAR_MAX_ENTRIES} entries)",
                                        MODULE_BACKENDS)
        basis = torch.eye(n_in, dtype=torch.float64).reshape((n_in, *shape))
        weight = double(basis).reshape(n_in, n_out).T.contiguous()
    bias = _d(m.bias) if m.bias is not None else torch.zeros(m.out_channels, dtype=torch.float64)
    flat_bias = bias.repeat_interleave(n_out // m.out_channels)
    return Dense(weight, flat_bias, tuple(shape), (n_out,)), Reshape((n_out,), out)


def _conv2d(m: nn.Conv2d, shape: Shape, name: str) -> Conv | tuple[Dense, Reshape]:
    if len(shape) != 3:
        raise UnsupportedLayerError(f"{name} (Conv2d on input of shape {shape})", MODULE_BACKENDS)
    if m.padding_mode == "circular" and not isinstance(m.padding, str):
        return _circular_conv2d(m, shape, name)
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{name} (Conv2d with padding_mode={m.padding_mode!r})",
                                    MODULE_BACKENDS)
    kh, kw = m.kernel_size
    sh, sw = _pair(m.stride)
    dh, dw = _pair(m.dilation)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pad = (0, 0, 0, 0)
        else:  # "same" (stride 1): torch puts the extra on the right/bottom
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = _pair(m.padding)
        pad = (pw, pw, ph, ph)
    c, h, w = shape
    out = (m.out_channels, _conv_out(h, kh, sh, dh, pad[2] + pad[3]),
           _conv_out(w, kw, sw, dw, pad[0] + pad[1]))
    bias = _d(m.bias) if m.bias is not None else torch.zeros(m.out_channels, dtype=torch.float64)
    return Conv(_d(m.weight), bias, tuple(shape), out, (sh, sw), pad, (dh, dw), m.groups)


def _avgpool(m: nn.AvgPool2d, shape: Shape, name: str) -> Conv:
    if m.ceil_mode or (any(_pair(m.padding)) and not m.count_include_pad) or m.divisor_override:
        raise UnsupportedLayerError(f"{name} (AvgPool2d with ceil_mode, divisor_override or "
                                    "count_include_pad=False)", MODULE_BACKENDS)
    kh, kw = _pair(m.kernel_size)
    sh, sw = _pair(m.stride if m.stride is not None else m.kernel_size)
    ph, pw = _pair(m.padding)
    c, h, w = shape
    weight = torch.full((c, 1, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)
    out = (c, _conv_out(h, kh, sh, 1, 2 * ph), _conv_out(w, kw, sw, 1, 2 * pw))
    return Conv(weight, torch.zeros(c, dtype=torch.float64), tuple(shape), out, (sh, sw),
                (pw, pw, ph, ph), (1, 1), c)


def _zeropad(pad: tuple[int, ...], shape: Shape, name: str) -> Conv:
    if any(p < 0 for p in pad) or len(shape) != 3:
        raise UnsupportedLayerError(f"{name} (negative padding or non-image input)",
                                    MODULE_BACKENDS)
    c, h, w = shape
    left, right, top, bottom = pad
    weight = torch.ones((c, 1, 1, 1), dtype=torch.float64)
    out = (c, h + top + bottom, w + left + right)
    return Conv(weight, torch.zeros(c, dtype=torch.float64), tuple(shape), out, (1, 1),
                (left, right, top, bottom), (1, 1), c)


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, shape: Shape) -> Diagonal:
    mean = m.running_mean if m.running_mean is not None else torch.zeros(m.num_features)
    var = m.running_var if m.running_var is not None else torch.ones(m.num_features)
    scale = 1.0 / torch.sqrt(_d(var) + m.eps)
    if m.weight is not None:
        scale = scale * _d(m.weight)
    shift = -_d(mean) * scale
    if m.bias is not None:
        shift = shift + _d(m.bias)
    return Diagonal(scale, shift, tuple(shape))


def _simple(module: nn.Module, shape: Shape, name: str
            ) -> Layer | Diagonal | tuple[Layer, ...] | None:
    """Map one non-container module to a layer (or a few); None means 'skip' (identity)."""
    match module:
        case nn.Linear():
            out = (module.out_features,)
            bias = _d(module.bias) if module.bias is not None else torch.zeros(out[0],
                                                                                dtype=torch.float64)
            if math.prod(shape) != module.in_features:
                raise UnsupportedLayerError(f"{name} (Linear expects {module.in_features} "
                                            f"inputs, gets shape {shape})", MODULE_BACKENDS)
            return Dense(_d(module.weight), bias, tuple(shape), out)
        case nn.Conv2d():
            return _conv2d(module, shape, name)
        case nn.ReLU() | nn.ReLU6() if isinstance(module, nn.ReLU):
            return Activation("relu", tuple(shape))
        case nn.LeakyReLU():
            return Activation("leaky_relu", tuple(shape), float(module.negative_slope))
        case nn.Tanh():
            return Activation("tanh", tuple(shape))
        case nn.Sigmoid():
            return Activation("sigmoid", tuple(shape))
        case GroupSort():
            if math.prod(shape) % module.group_size:
                raise UnsupportedLayerError(f"{name} (GroupSort group does not divide width)",
                                            MODULE_BACKENDS)
            return Activation("groupsort", tuple(shape), float(module.group_size))
        case nn.Flatten():
            start = module.start_dim - 1 if module.start_dim > 0 else module.start_dim
            if start != 0 or module.end_dim != -1:
                raise UnsupportedLayerError(f"{name} (Flatten over part of the sample)",
                                            MODULE_BACKENDS)
            return Reshape(tuple(shape), (math.prod(shape),))
        case nn.Unflatten():
            if module.dim not in (1, -1 if len(shape) == 1 else 1):
                raise UnsupportedLayerError(f"{name} (Unflatten of dim {module.dim})",
                                            MODULE_BACKENDS)
            return Reshape(tuple(shape), tuple(int(s) for s in module.unflattened_size))
        case nn.BatchNorm1d() | nn.BatchNorm2d():
            return _batchnorm(module, shape)
        case Normalize():
            return Diagonal(1.0 / _d(module.std), -_d(module.mean) / _d(module.std), tuple(shape))
        case nn.AvgPool2d():
            return _avgpool(module, shape, name)
        case nn.ZeroPad2d():
            return _zeropad(tuple(int(p) for p in module.padding), shape, name)
        case nn.ConstantPad2d() if float(module.value) == 0.0:
            return _zeropad(tuple(int(p) for p in module.padding), shape, name)
        case nn.Identity() | nn.Dropout():
            return None
    raise UnsupportedLayerError(f"{name} ({type(module).__name__})", MODULE_BACKENDS)


def _walk(module: nn.Module, shape: Shape, name: str) -> tuple[list[Layer | Diagonal], Shape]:
    if isinstance(module, nn.Sequential):
        out: list[Layer | Diagonal] = []
        for child_name, child in module.named_children():
            layers, shape = _walk(child, shape, f"{name}.{child_name}" if name else child_name)
            out.extend(layers)
        return out, shape
    if isinstance(module, ResidualBlock):
        body, body_shape = _walk(module.body, shape, f"{name}.body")
        if tuple(body_shape) != tuple(shape):
            raise UnsupportedLayerError(f"{name} (residual body changes shape {shape} -> "
                                        f"{body_shape})", MODULE_BACKENDS)
        return [Residual(tuple(fold(body)), tuple(shape))], shape
    layer = _simple(module, shape, name or type(module).__name__)
    if layer is None:
        return [], shape
    if isinstance(layer, tuple):
        return list(layer), tuple(layer[-1].out_shape)
    return [layer], tuple(layer.out_shape)


def extract_layers(module: nn.Module, input_shape: Shape) -> tuple[Layer, ...]:
    """The normalised layer view of `module` for inputs of `input_shape` (no batch dim)."""
    layers, _ = _walk(module, tuple(input_shape), "")
    return tuple(fold(layers))


def _diag_as_layers(diag: Diagonal) -> list[Layer]:
    """A diagonal map that could not be folded: a depthwise 1x1 conv (or a dense diagonal)."""
    shape = diag.in_shape
    if torch.all(diag.scale == 1):  # a translation (or nothing): Lipschitz constant exactly 1
        shift = diag.full(diag.shift)
        return [Shift(shift.clone(), shape)] if torch.any(shift != 0) else []
    if len(shape) == 3 and diag.scale.numel() == shape[0] == diag.shift.numel():
        c = shape[0]
        return [Conv(diag.scale.view(c, 1, 1, 1).clone(), diag.shift.clone(), shape, shape,
                     groups=c)]
    n = math.prod(shape)
    scale = diag.full(diag.scale).reshape(n)
    shift = diag.full(diag.shift).reshape(n)
    layers: list[Layer] = [Dense(torch.diag(scale), shift, (n,), (n,))]
    if len(shape) != 1:
        layers = [Reshape(shape, (n,)), *layers, Reshape((n,), shape)]
    return layers


def _fold_into_next(diag: Diagonal, nxt: Layer) -> list[Layer] | None:
    """`nxt(diag(x))` as layers, exactly, or None."""
    if isinstance(nxt, Dense):
        scale = diag.full(diag.scale).reshape(-1)
        shift = diag.full(diag.shift).reshape(-1)
        return [Dense(nxt.weight * scale, nxt.bias + nxt.weight @ shift, diag.in_shape,
                      nxt.out_shape)]
    if isinstance(nxt, Conv) and len(diag.in_shape) == 3 and diag.scale.numel() == \
            diag.in_shape[0] and nxt.groups == 1:
        weight = nxt.weight * diag.scale.view(1, -1, 1, 1)
        scaled = Conv(weight, nxt.bias, nxt.in_shape, nxt.out_shape, nxt.stride, nxt.padding,
                      nxt.dilation, nxt.groups)
        if not torch.any(diag.shift != 0):
            return [scaled]
        if not any(nxt.padding):  # a constant input shift maps to a constant output shift
            const = diag.full(diag.shift).unsqueeze(0)
            bias_map = nxt.linear(const)[0]
            if torch.allclose(bias_map, bias_map[:, :1, :1].expand_as(bias_map), atol=0,
                              rtol=1e-12):
                bias = nxt.bias + bias_map[:, 0, 0]
                return [Conv(weight, bias, nxt.in_shape, nxt.out_shape, nxt.stride,
                             nxt.padding, nxt.dilation, nxt.groups)]
        # With zero padding the shift is not constant at the border: keep it as a translation,
        # before the scaling (s*x + t = s*(x + t/s), and zero padding commutes with scaling).
        if torch.any(diag.scale == 0):
            return None
        return [Shift(diag.full(diag.shift / diag.scale).clone(), diag.in_shape), scaled]
    return None


def _fold_into_prev(prev: Layer, diag: Diagonal) -> Layer | None:
    """`diag(prev(x))` as one layer, exactly, or None."""
    if isinstance(prev, Dense):
        scale = diag.full(diag.scale).reshape(-1)
        shift = diag.full(diag.shift).reshape(-1)
        return Dense(prev.weight * scale[:, None], prev.bias * scale + shift, prev.in_shape,
                     prev.out_shape)
    if isinstance(prev, Conv) and diag.scale.numel() == prev.out_shape[0] == \
            diag.shift.numel():
        weight = prev.weight * diag.scale.view(-1, 1, 1, 1)
        return Conv(weight, prev.bias * diag.scale + diag.shift, prev.in_shape, prev.out_shape,
                    prev.stride, prev.padding, prev.dilation, prev.groups)
    return None


def _is_pure_pad(layer: Layer) -> bool:
    return (isinstance(layer, Conv) and layer.weight.shape[2:] == (1, 1)
            and layer.groups == layer.in_shape[0] == layer.weight.shape[0]
            and bool(torch.all(layer.weight == 1)) and not torch.any(layer.bias != 0)
            and layer.stride == (1, 1))


def _merge_pad(pad: Conv, conv: Conv) -> Conv:
    """Zero padding `pad` followed by `conv` as one convolution."""
    padding = tuple(a + b for a, b in zip(pad.padding, conv.padding, strict=True))
    return Conv(conv.weight, conv.bias, pad.in_shape, conv.out_shape, conv.stride, padding,
                conv.dilation, conv.groups)


def fold(layers: list[Layer | Diagonal]) -> list[Layer]:
    """Fold diagonal maps and explicit zero padding into neighbouring affine layers, exactly."""
    out: list[Layer] = []
    items = list(layers)
    i = 0
    while i < len(items):
        item = items[i]
        if isinstance(item, Diagonal):
            nxt = items[i + 1] if i + 1 < len(items) else None
            if isinstance(nxt, Diagonal) and nxt.in_shape == item.in_shape:
                items[i + 1] = item.then(nxt)  # compose consecutive diagonal maps first
                i += 1
                continue
            prev = out[-1] if out else None
            merged = _fold_into_prev(prev, item) if prev is not None else None
            after = items[i + 2] if i + 2 < len(items) else None
            padded = _merge_pad(nxt, after) if _is_pure_pad(nxt) and isinstance(
                after, Conv) else None
            through_pad = _fold_into_next(item, padded) if padded is not None else None
            if merged is not None:
                out[-1] = merged
            elif through_pad is not None:  # diagonal, zero padding, convolution: one conv
                out.extend(through_pad)
                i += 2
            elif isinstance(nxt, Reshape) and isinstance(after, (Dense, Diagonal)):
                out.append(nxt)  # move the diagonal past the reshape, towards the dense layer
                items[i + 1] = item.reshaped(nxt.out_shape)
            else:
                folded = _fold_into_next(item, nxt) if isinstance(nxt, (Dense, Conv)) else None
                if folded is not None:
                    out.extend(folded)
                    i += 1
                else:
                    out.extend(_diag_as_layers(item))
        elif _is_pure_pad(item) and i + 1 < len(items) and isinstance(items[i + 1], Conv):
            out.append(_merge_pad(item, items[i + 1]))
            i += 1
        else:
            out.append(item)
        i += 1
    return out
