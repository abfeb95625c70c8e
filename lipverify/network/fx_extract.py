"""The layer view of a torch.fx graph: onnx2torch's GraphModules and traced torch modules.

Walks the nodes the output depends on, in order, and keeps for every tensor computed from the
input the chain of layers that computes it. A node maps to layers exactly or the walk stops with
an `UnsupportedLayerError` naming the node and its op:

- standard modules (Linear, Conv2d, BatchNorm, AvgPool, padding, activations...) through
  `extract.py`'s per-module mapping;
- `Add/Sub/Mul/Div/Neg` with a constant operand: a diagonal affine map (folded later);
- `MatMul/Gemm/Linear` with constant weights: a dense layer, read off by probing the op with the
  unit vectors in float64 (and checked on random inputs);
- `Flatten/Reshape/Squeeze/Unsqueeze/view`: a reshape, checked to keep the element order;
- constant zero `Pad`: zero padding (folded into the next convolution);
- `add(x, g(x))`: a residual block.

Graphs that only take one sample at a time run inside `PerSample`; their layer view is read the
same way, applying each probe per sample.
"""

from __future__ import annotations

import copy
import enum
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lipverify.errors import UnsupportedLayerError
from lipverify.network._fx_ops import (
    ELEMENTWISE,
    PerSample,
    onnx_pads_to_torch,
    op_kind,
    op_name,
    to_double,
    trace,
)
from lipverify.network.extract import MODULE_BACKENDS, Diagonal, _simple, _zeropad, fold
from lipverify.network.layers import Activation, Dense, Layer, Reshape, Residual, Shape

log = logging.getLogger(__name__)

# Largest matrix (entries) read off by probing a MatMul/Gemm/Transpose with unit vectors.
MAX_DENSE_ENTRIES = 1 << 24
PROBE_CHUNK = 512
# Relative tolerance of the float64 checks that a probed map is the affine map read off.
PROBE_RTOL = 1e-9

class _Mode(enum.Enum):
    BATCHED = "batched"      # the graph takes (B, *shape) for any B
    SINGLE = "single"        # the graph takes (1, *shape) only
    UNBATCHED = "unbatched"  # the graph takes one sample shaped `shape`, no batch dimension


@dataclass(frozen=True)
class _Chain:
    """Layers computing a tensor from the graph input, and the tensor's per-sample shape."""

    layers: tuple[Layer | Diagonal, ...]
    shape: Shape


class _Walker:
    """One walk over one graph (no state outlives it)."""

    def __init__(self, gm: fx.GraphModule, mode: _Mode, input_shape: Shape) -> None:
        self.gm = gm
        self.mode = mode
        self.input_shape = tuple(input_shape)
        self.env: dict[fx.Node, Any] = {}
        self.chains: dict[fx.Node, _Chain] = {}
        self.doubles: dict[str, nn.Module] = {}

    # -- running ops ---------------------------------------------------------------------------
    def _module(self, target: str, double: bool) -> nn.Module:
        if not double:
            return self.gm.get_submodule(target)
        if target not in self.doubles:
            self.doubles[target] = copy.deepcopy(self.gm.get_submodule(target)).double()
        return self.doubles[target]

    def _call(self, node: fx.Node, args: tuple, kwargs: dict, double: bool) -> Any:
        if node.op == "call_module":
            return self._module(node.target, double)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        obj, *rest = args
        return getattr(obj, node.target)(*rest, **kwargs)

    def _concrete(self, node: fx.Node) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n])
        return self._call(node, args, kwargs, double=False)

    def _probe(self, node: fx.Node, data: fx.Node, x: torch.Tensor) -> torch.Tensor:
        """The node's op in float64 on samples `x` in place of `data`, batched as the graph is."""
        def run(sample: torch.Tensor) -> torch.Tensor:
            args, kwargs = fx.node.map_arg(
                (node.args, node.kwargs), lambda n: sample if n is data else self.env[n])
            return self._call(node, to_double(args), to_double(kwargs), double=True)

        if self.mode is _Mode.BATCHED:
            return torch.cat([run(x[i:i + PROBE_CHUNK]) for i in range(0, len(x), PROBE_CHUNK)])
        if self.mode is _Mode.SINGLE:
            return torch.cat([run(x[i:i + 1]) for i in range(len(x))])
        return torch.stack([run(x[i]) for i in range(len(x))])

    def _sample_shape(self, value: torch.Tensor) -> Shape:
        shape = tuple(value.shape)
        return shape if self.mode is _Mode.UNBATCHED else shape[1:]

    # -- one node ------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        """Compute the node's concrete value and, if it depends on the input, its chain."""
        if node.op == "placeholder":
            if self.chains:
                raise UnsupportedLayerError(f"{node.name} (a second graph input)", MODULE_BACKENDS)
            gen = torch.Generator().manual_seed(0)
            batch = {_Mode.BATCHED: (2,), _Mode.SINGLE: (1,), _Mode.UNBATCHED: ()}[self.mode]
            dtype = next((t.dtype for t in (*self.gm.parameters(), *self.gm.buffers())
                          if t.is_floating_point()), torch.float32)
            self.env[node] = torch.rand((*batch, *self.input_shape), generator=gen).to(dtype)
            self.chains[node] = _Chain((), self.input_shape)
            return
        if node.op == "get_attr":
            self.env[node] = functools.reduce(getattr, node.target.split("."), self.gm)
            return
        label = f"{node.name} ({op_name(node, self.gm)})"
        try:
            with torch.no_grad():
                self.env[node] = self._concrete(node)
        except Exception as exc:  # noqa: BLE001 - any failure on the probe input: unsupported
            raise UnsupportedLayerError(f"{label}: {exc}", MODULE_BACKENDS) from exc
        data = [n for n in node.all_input_nodes if n in self.chains]
        if not data:
            return
        value = self.env[node]
        if op_kind(node, self.gm) == "shape":
            return  # shape metadata as a tensor (ONNX Shape): a constant, like x.size(0)
        if not isinstance(value, torch.Tensor):
            if isinstance(value, (int, torch.Size)) or (
                    isinstance(value, tuple) and all(isinstance(v, int) for v in value)):
                return  # shape metadata (x.size(0), x.shape)
            raise UnsupportedLayerError(f"{label} (returns {type(value).__name__})",
                                        MODULE_BACKENDS)
        try:
            with torch.no_grad():
                chain = self._layer(node, data, label)
        except UnsupportedLayerError:
            raise
        except Exception as exc:  # noqa: BLE001 - a probe that fails: the op is not what we map
            raise UnsupportedLayerError(f"{label}: {exc}", MODULE_BACKENDS) from exc
        if chain.shape != self._sample_shape(value):
            raise UnsupportedLayerError(f"{label} (layer shape {chain.shape} differs from "
                                        f"{self._sample_shape(value)})", MODULE_BACKENDS)
        self.chains[node] = chain

    def _layer(self, node: fx.Node, data: list[fx.Node], label: str) -> _Chain:
        kind = op_kind(node, self.gm)
        if len(data) == 2 and kind == "add":
            return self._residual(self.chains[data[0]], self.chains[data[1]], label)
        if len(data) != 1:
            raise UnsupportedLayerError(f"{label} (combines {len(data)} computed tensors)",
                                        MODULE_BACKENDS)
        src = data[0]
        chain = self.chains[src]
        shape = chain.shape
        new: Layer | Diagonal | None
        if kind in ELEMENTWISE:
            new = self._diagonal(node, src, kind, shape, label)
        elif kind in ("relu", "tanh", "sigmoid"):
            new = Activation(kind, shape)
        elif kind == "reshape":
            new = self._reshape(node, src, shape)
        elif kind == "linear" and len(shape) == 1 and self.mode is not _Mode.UNBATCHED:
            new = _simple(self.gm.get_submodule(node.target), shape, label)
        elif kind in ("matmul", "linear"):
            new = self._dense(node, src, shape, label)
        elif kind == "pad":
            new = self._pad(node, shape, label)
        elif node.op == "call_module" and kind is None and (
                self.mode is not _Mode.UNBATCHED or isinstance(
                    self.gm.get_submodule(node.target), (nn.ReLU, nn.Tanh, nn.Sigmoid))):
            new = _simple(self.gm.get_submodule(node.target), shape, label)
        else:
            raise UnsupportedLayerError(label, MODULE_BACKENDS)
        if new is None:
            return chain
        news = new if isinstance(new, tuple) else (new,)
        return _Chain((*chain.layers, *news), tuple(news[-1].out_shape))

    # -- the mappings --------------------------------------------------------------------------
    def _residual(self, a: _Chain, b: _Chain, label: str) -> _Chain:
        if a.shape != b.shape:
            raise UnsupportedLayerError(f"{label} (adds shapes {a.shape} and {b.shape})",
                                        MODULE_BACKENDS)
        short, long = (a, b) if len(a.layers) <= len(b.layers) else (b, a)
        if not all(x is y for x, y in zip(short.layers, long.layers, strict=False)):
            raise UnsupportedLayerError(f"{label} (adds two branches that are not x + f(x))",
                                        MODULE_BACKENDS)
        body = long.layers[len(short.layers):]
        if not body:  # x + x
            two = torch.full(a.shape, 2.0, dtype=torch.float64)
            step: Layer | Diagonal = Diagonal.of(two, torch.zeros_like(two), a.shape)
        else:
            step = Residual(tuple(fold(list(body))), a.shape)
        return _Chain((*short.layers, step), a.shape)

    def _diagonal(self, node: fx.Node, src: fx.Node, kind: str, shape: Shape,
                  label: str) -> Diagonal:
        actual = tuple(self.env[src].shape)
        if kind == "neg":
            scale = torch.full(shape, -1.0, dtype=torch.float64)
            shift = torch.zeros(shape, dtype=torch.float64)
        else:
            if node.kwargs or len(node.args) != 2:
                raise UnsupportedLayerError(f"{label} (extra arguments)", MODULE_BACKENDS)
            first = node.args[0] is src
            other = node.args[1] if first else node.args[0]
            if isinstance(other, fx.Node) and other in self.chains:
                raise UnsupportedLayerError(f"{label} (of the input with itself)", MODULE_BACKENDS)
            const = self.env[other] if isinstance(other, fx.Node) else other
            const = torch.as_tensor(const, dtype=torch.float64).detach()
            if torch.broadcast_shapes(actual, const.shape) != actual or (
                    self.mode is not _Mode.UNBATCHED and const.dim() >= len(actual)
                    and const.shape[0] != 1):
                raise UnsupportedLayerError(f"{label} (constant of shape {tuple(const.shape)} "
                                            f"does not broadcast per sample)", MODULE_BACKENDS)
            full = const.broadcast_to(actual)
            c = (full if self.mode is _Mode.UNBATCHED else full[0]).clone()
            ones, zeros = torch.ones_like(c), torch.zeros_like(c)
            if kind == "add":
                scale, shift = ones, c
            elif kind == "sub":
                scale, shift = (ones, -c) if first else (-ones, c)
            elif kind == "mul":
                scale, shift = c, zeros
            elif first and not torch.any(c == 0):
                scale, shift = 1.0 / c, zeros
            else:
                raise UnsupportedLayerError(f"{label} (division by the input or by zero)",
                                            MODULE_BACKENDS)
        diag = Diagonal.of(scale, shift, shape)
        x = _random((3, *shape), seed=1)
        want = diag.full(diag.scale) * x + diag.full(diag.shift)
        self._check(self._probe(node, src, x), want, label)
        return diag

    def _reshape(self, node: fx.Node, src: fx.Node, shape: Shape) -> Reshape | None:
        n = math.prod(shape)
        x = torch.arange(2 * n, dtype=torch.float64).reshape((2, *shape))
        out = self._probe(node, src, x)
        if out.shape[0] != 2 or not torch.equal(out.reshape(-1), x.reshape(-1)):
            raise UnsupportedLayerError(f"{node.name} (reorders elements)", MODULE_BACKENDS)
        new = tuple(out.shape[1:])
        return None if new == tuple(shape) else Reshape(tuple(shape), new)

    def _dense(self, node: fx.Node, src: fx.Node, shape: Shape, label: str) -> Dense:
        n = math.prod(shape)
        bias_out = self._probe(node, src, torch.zeros((1, *shape), dtype=torch.float64))
        out_shape = tuple(bias_out.shape[1:])
        if n * max(1, math.prod(out_shape)) > MAX_DENSE_ENTRIES:
            raise UnsupportedLayerError(f"{label} (a {math.prod(out_shape)}x{n} matrix is too "
                                        "large to expand)", MODULE_BACKENDS)
        bias = bias_out.reshape(-1).clone()
        columns = []
        for lo in range(0, n, PROBE_CHUNK):  # the unit vectors, a chunk at a time
            hi = min(lo + PROBE_CHUNK, n)
            basis = torch.zeros((hi - lo, n), dtype=torch.float64)
            basis[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
            out = self._probe(node, src, basis.reshape((hi - lo, *shape)))
            columns.append(out.reshape(hi - lo, -1) - bias)
        weight = torch.cat(columns).T.contiguous()
        layer = Dense(weight, bias, tuple(shape), out_shape)
        x = _random((3, *shape), seed=2)
        self._check(self._probe(node, src, x), layer.forward(x), label)
        return layer

    def _pad(self, node: fx.Node, shape: Shape, label: str) -> Layer:
        module = self.gm.get_submodule(node.target)
        if type(module).__name__ == "OnnxPadStatic":
            mode, pads, value = module.mode, list(module.pads), module.constant_value
        else:
            args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
            pads = onnx_pads_to_torch([int(p) for p in args[1].tolist()])
            value = args[2] if len(args) > 2 and args[2] is not None else 0.0
            mode = module.mode
        value = float(torch.as_tensor(value).reshape(-1)[0]) if torch.is_tensor(value) else \
            float(value)
        if mode != "constant" or value != 0.0 or self.mode is _Mode.UNBATCHED or \
                any(pads[4:]) or len(pads) < 4:
            raise UnsupportedLayerError(f"{label} ({mode} padding with value {value} on "
                                        f"{pads})", MODULE_BACKENDS)
        return _zeropad(tuple(pads[:4]), shape, label)

    @staticmethod
    def _check(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
        scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
        if got.shape != want.shape or float((got - want).abs().max()) > PROBE_RTOL * scale:
            raise UnsupportedLayerError(f"{label} (not the affine map read off)",
                                        MODULE_BACKENDS)

    # -- the whole graph -----------------------------------------------------------------------
    def run(self) -> tuple[Layer, ...]:
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        live = _ancestors(output)
        for node in self.gm.graph.nodes:
            if node in live and node.op != "output":
                self.visit(node)
        result = output.args[0]
        if not isinstance(result, fx.Node) or result not in self.chains:
            raise UnsupportedLayerError(f"output ({type(result).__name__} is not one computed "
                                        "tensor)", MODULE_BACKENDS)
        chain = self.chains[result]
        layers = fold(list(chain.layers))
        if len(chain.shape) != 1:
            layers.append(Reshape(chain.shape, (math.prod(chain.shape),)))
        return tuple(layers)


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def fx_layers(module: nn.Module, input_shape: Shape) -> tuple[Layer, ...]:
    """The layer view of `module` (a GraphModule, a `PerSample` or a traceable module).

    Raises `UnsupportedLayerError` naming the first node it cannot map exactly.
    """
    if isinstance(module, PerSample):
        mode = _Mode.SINGLE if module.batch_dim else _Mode.UNBATCHED
        gm = trace(module.graph)
    else:
        mode = _Mode.BATCHED
        gm = trace(module)
    was_training = gm.training
    gm.eval()
    try:
        return _Walker(gm, mode, tuple(input_shape)).run()
    finally:
        gm.train(was_training)
