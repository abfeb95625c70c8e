"""What fx nodes mean: canonical op names, messages, tracing, and the per-sample wrapper.

Shared vocabulary of `fx_extract.py`: functions, methods and modules (torch's and onnx2torch's,
the latter by class name so onnx2torch is imported only for ONNX files) mapped to the few op
kinds the layer walk knows.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from lipverify.errors import UnsupportedLayerError
from lipverify.network.extract import MODULE_BACKENDS
from lipverify.network.modules import GroupSort, Normalize

ELEMENTWISE = {"add", "sub", "mul", "div", "neg"}
# "matmul" covers every op linear in its one computed input (MatMul/Gemm with constant weights,
# transposes): it becomes a dense layer read off by probing.
_FUNCTIONS: dict[Callable[..., Any], str] = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    operator.neg: "neg", torch.neg: "neg", torch.relu: "relu", F.relu: "relu",
    torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.flatten: "reshape",
    torch.reshape: "reshape", torch.squeeze: "reshape", torch.unsqueeze: "reshape",
    operator.matmul: "matmul", torch.matmul: "matmul", F.linear: "matmul",
    torch.permute: "matmul", torch.transpose: "matmul",
}
_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg",
            "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "view": "reshape",
            "reshape": "reshape", "flatten": "reshape", "squeeze": "reshape",
            "unsqueeze": "reshape", "contiguous": "reshape", "matmul": "matmul",
            "permute": "matmul", "transpose": "matmul"}
# onnx2torch's own modules, by class name (onnx2torch is imported only for ONNX files).
_ONNX_MODULES = {"OnnxMatMul": "matmul", "OnnxGemm": "matmul", "OnnxFlatten": "reshape",
                 "OnnxReshape": "reshape", "OnnxSqueezeStaticAxes": "reshape",
                 "OnnxSqueezeDynamicAxes": "reshape", "OnnxUnsqueezeStaticAxes": "reshape",
                 "OnnxUnsqueezeDynamicAxes": "reshape", "OnnxCopyIdentity": "reshape",
                 "OnnxNeg": "neg", "OnnxPadStatic": "pad", "OnnxPadDynamic": "pad",
                 "OnnxShape": "shape", "OnnxTranspose": "matmul"}
_DIVISION_NAMES = {"_onnx_div", "div", "true_divide"}


class PerSample(nn.Module):
    """Runs a graph that takes one sample at a time (with a batch dimension of 1, or none)."""

    def __init__(self, graph: nn.Module, batch_dim: bool) -> None:
        super().__init__()
        self.graph = graph
        self.batch_dim = bool(batch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the graph to each sample of the batch `x`."""
        if self.batch_dim:
            return torch.cat([self.graph(x[i:i + 1]) for i in range(x.shape[0])])
        return torch.stack([self.graph(x[i]) for i in range(x.shape[0])])


class _Tracer(fx.Tracer):
    """Keeps lipverify's own modules whole, so `extract.py` maps them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (GroupSort, Normalize)) or super().is_leaf_module(m, qualname)


def to_double(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    if isinstance(value, (list, tuple)):
        return type(value)(to_double(v) for v in value)
    return value


def op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """What a node does, for messages: a module class, function or method name."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        name = type(module).__name__
        fn = getattr(module, "function", None) or getattr(module, "math_op_function", None)
        return f"{name} {getattr(fn, '__name__', '')}".strip()
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """A canonical op name for the ops mapped here (None: a module for `extract._simple`)."""
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target, "other")
    if node.op == "call_method":
        return _METHODS.get(node.target, "other")
    module = gm.get_submodule(node.target)
    name = type(module).__name__
    if name == "OnnxBinaryMathOperation":
        fn_name = module.math_op_function.__name__
        return "div" if fn_name in _DIVISION_NAMES else fn_name
    if isinstance(module, (nn.Flatten, nn.Unflatten)):
        return "reshape"
    if isinstance(module, nn.Linear):
        return "linear"
    return _ONNX_MODULES.get(name)


def onnx_pads_to_torch(pads: list[int]) -> list[int]:
    """ONNX `[x1_begin, x2_begin, ..., x1_end, x2_end, ...]` to torch's last-dim-first pairs."""
    half = len(pads) // 2
    out: list[int] = []
    for begin, end in zip(reversed(pads[:half]), reversed(pads[half:]), strict=True):
        out.extend([int(begin), int(end)])
    return out


def trace(module: nn.Module) -> fx.GraphModule:
    """`module` as an fx GraphModule (lipverify's own modules kept whole)."""
    if isinstance(module, fx.GraphModule):
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow and the like
        raise UnsupportedLayerError(f"{type(module).__name__} (not traceable by torch.fx: "
                                    f"{type(exc).__name__})", MODULE_BACKENDS) from exc
    return fx.GraphModule(module, graph)
