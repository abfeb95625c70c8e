"""onnx2torch converters for the op versions it lacks, so opsets 7-21 convert.

onnx2torch picks a converter by the version of an op's schema at the model's opset (Reshape at
opset 20 is Reshape-19) and its last release (1.5.15, 2024) stops at opset 17 for most ops, and
at an odd version for a few older ones (Gemm-7, Slice-1, Constant-1). Most newer versions only
widened the accepted element types (float8, int4, bfloat16...), so the older converter computes
the same function; `ALIASES` names it, citing what changed. Where a version added an attribute,
`CONDITIONS` says what must hold for the older converter to be exact (AveragePool-19's
`dilations` all 1), and a node outside it is refused by name. Three need converters of their
own: Pad-18's optional `axes` input, Reduce*-18's `axes` moving from an attribute to an input,
and Slice-1 (opsets 7-9; onnx2torch registers its attribute form as version 9, where no schema
looks it up, and that converter does not run). One change is made in the graph instead
(`rewrite_exact`): the dynamo exporter writes Reshape with `allowzero=1`, which onnx2torch
refuses; with a constant target free of zeros it means the same as `allowzero=0` and is
rewritten so. Every converted graph is still checked
against onnxruntime running the original file, by `onnx_import`.

Registration uses onnx2torch's own `add_converter` and skips any version onnx2torch (a later
release) already converts.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from lipverify.network._torchvision_compat import import_onnx2torch

log = logging.getLogger(__name__)

# (op, version onnx2torch lacks) -> the version whose converter computes the same function.
ALIASES: dict[tuple[str, int], int] = {
    ("Gemm", 7): 9,                 # 9 added integer types
    ("MaxPool", 1): 8,              # 8 added storage_order, which only orders the Indices output
    ("BatchNormalization", 7): 9,   # 9 dropped `spatial` (see CONDITIONS)
    ("Flatten", 1): 9,              # types
    ("Flatten", 21): 13,            # types
    ("Reshape", 19): 14,            # types (allowzero is 14's and converts as in 14)
    ("Reshape", 21): 14,
    ("Transpose", 21): 13,
    ("Unsqueeze", 21): 13,
    ("Shape", 19): 15,              # types (start/end are 15's)
    ("Shape", 21): 15,
    ("Constant", 1): 9,
    ("Constant", 19): 13,
    ("Constant", 21): 13,
    ("ConstantOfShape", 20): 9,
    ("ConstantOfShape", 21): 9,
    ("Identity", 19): 16,
    ("Identity", 21): 16,
    ("Cast", 6): 9,
    ("Cast", 19): 13,               # 19 added `saturate`, which only affects float8 targets
    ("Cast", 21): 13,
    ("Dropout", 7): 10,
    ("AveragePool", 19): 11,        # 19 added `dilations` (see CONDITIONS)
}
_REDUCE_AXES_INPUT = {  # Reduce* ops whose `axes` became an input at 18 (ReduceSum at 13)
    "ReduceMean": (18,), "ReduceMax": (18, 20), "ReduceMin": (18, 20), "ReduceProd": (18,),
    "ReduceL1": (18,), "ReduceL2": (18,), "ReduceLogSum": (18,), "ReduceLogSumExp": (18,),
    "ReduceSumSquare": (18,),
}
_PAD_VERSIONS = (18, 19, 21)  # 18: optional `axes` input; 19: mode "wrap"; 21: types


def _ones(name: str) -> Callable[[Mapping[str, Any]], str | None]:
    def check(attrs: Mapping[str, Any]) -> str | None:
        values = attrs.get(name)
        if values is not None and any(int(v) != 1 for v in values):
            return f"with {name} {tuple(int(v) for v in values)}"
        return None

    return check


def _spatial(attrs: Mapping[str, Any]) -> str | None:
    return None if int(attrs.get("spatial", 1)) == 1 else "with spatial=0"


def _pad_mode(attrs: Mapping[str, Any]) -> str | None:
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    return None if mode in ("constant", "reflect", "edge") else f"with mode {mode!r}"


# (op, version) -> a check of the node's attributes: None when the converter is exact, else why not.
CONDITIONS: dict[tuple[str, int], Callable[[Mapping[str, Any]], str | None]] = {
    ("AveragePool", 19): _ones("dilations"),
    ("BatchNormalization", 7): _spatial,
    **{("Pad", v): _pad_mode for v in _PAD_VERSIONS},
}


def refusal(op_type: str, version: int, attrs: Mapping[str, Any]) -> str | None:
    """Why a node of schema `version` does not convert exactly (None: it does, or no check)."""
    check = CONDITIONS.get((op_type, version))
    return check(attrs) if check is not None else None


def _checked(op_type: str, version: int, convert: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(convert)
    def converter(node: Any, graph: Any) -> Any:
        why = refusal(op_type, version, node.attributes)
        if why is not None:
            raise NotImplementedError(f"{op_type}-{version} {why}")
        return convert(node, graph)

    return converter


def _constant(name: str, graph: Any, what: str) -> Any:
    from onnx2torch.utils.common import get_const_value

    try:
        return get_const_value(name, graph)
    except KeyError as exc:
        raise NotImplementedError(f"{what} is computed, not a constant") from exc


def _pad_converter(pad13: Callable[..., Any]) -> Callable[..., Any]:
    """Pad-18/19/21: without `axes` as Pad-13; with constant `axes`, the full pads made static."""
    def converter(node: Any, graph: Any) -> Any:
        from onnx2torch.node_converters.pad import OnnxPadStatic
        from onnx2torch.utils.common import (
            OnnxMapping,
            OperationConverterResult,
            get_shape_from_value_info,
        )

        why = _pad_mode(node.attributes)
        if why is not None:
            raise NotImplementedError(f"Pad {why}")
        inputs = node.input_values
        if len(inputs) < 4 or not inputs[3]:
            return pad13(node, graph)
        rank = len(get_shape_from_value_info(graph.value_info[inputs[0]]))
        pads = [int(p) for p in _constant(inputs[1], graph, "Pad's pads").tolist()]
        axes = [int(a) % rank for a in _constant(inputs[3], graph, "Pad's axes").tolist()]
        value = 0.0
        if len(inputs) > 2 and inputs[2]:
            value = float(_constant(inputs[2], graph, "Pad's constant_value").reshape(-1)[0])
        full = [0] * (2 * rank)
        for i, axis in enumerate(axes):
            full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
        mode = node.attributes.get("mode", "constant")
        module = OnnxPadStatic.create_from_onnx_params(onnx_pads=full, onnx_mode=mode,
                                                       constant_value=value)
        return OperationConverterResult(
            torch_module=module,
            onnx_mapping=OnnxMapping(inputs=(inputs[0],), outputs=node.output_values))

    return converter


class SliceStatic(nn.Module):
    """Slice-1: constant `starts`/`ends` on `axes` (clamped like Python slices, as ONNX says)."""

    def __init__(self, starts: list[int], ends: list[int], axes: list[int] | None) -> None:
        super().__init__()
        self.starts, self.ends = list(starts), list(ends)
        self.axes = list(axes) if axes is not None else list(range(len(starts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` sliced."""
        index = [slice(None)] * x.dim()
        for start, end, axis in zip(self.starts, self.ends, self.axes, strict=True):
            index[axis % x.dim()] = slice(start, end)
        return x[tuple(index)]


def _slice1_converter(node: Any, graph: Any) -> Any:
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    attrs = node.attributes
    axes = attrs.get("axes")
    module = SliceStatic([int(v) for v in attrs["starts"]], [int(v) for v in attrs["ends"]],
                         [int(v) for v in axes] if axes is not None else None)
    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=onnx_mapping_from_node(node))


def _reduce_converter(node: Any, graph: Any) -> Any:
    """Reduce*-18 (axes an optional input) as onnx2torch's static-axes reduction."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    inputs = node.input_values
    axes = None
    if len(inputs) > 1 and inputs[1]:
        axes = [int(a) for a in _constant(inputs[1], graph, f"{node.operation_type}'s axes")
                .reshape(-1).tolist()]
    keepdims = int(node.attributes.get("keepdims", 1))
    module: nn.Module
    if not axes and int(node.attributes.get("noop_with_empty_axes", 0)):
        module = nn.Identity()
    else:
        module = OnnxReduceStaticAxes(node.operation_type, axes or None, keepdims)
    return OperationConverterResult(
        torch_module=module, onnx_mapping=OnnxMapping(inputs=(inputs[0],),
                                                       outputs=node.output_values))


def _constant_values(model: onnx.ModelProto) -> dict[str, Any]:
    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    return values


def rewrite_exact(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or a copy with Reshape's `allowzero=1` dropped where the target has no 0."""
    constants = _constant_values(model)
    targets = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        flag = next((a for a in node.attribute if a.name == "allowzero"), None)
        if flag is not None and flag.i == 1 and \
                0 not in numpy_helper.to_array(constants[node.input[1]]).reshape(-1).tolist():
            targets.append(i)
    if not targets:
        return model
    model = copy.deepcopy(model)
    for i in targets:
        node = model.graph.node[i]
        keep = [a for a in node.attribute if a.name != "allowzero"]
        del node.attribute[:]
        node.attribute.extend(keep)
    return model


@functools.cache
def register_converters() -> tuple[tuple[str, int], ...]:
    """Add the converters above to onnx2torch's registry (once); the (op, version)s added."""
    import_onnx2torch()
    from onnx2torch.node_converters.registry import (
        _CONVERTER_REGISTRY,
        OperationDescription,
        add_converter,
    )

    def registered(op_type: str, version: int) -> Callable[..., Any] | None:
        # the registry by exact version: get_converter would first map `version` to its schema
        return _CONVERTER_REGISTRY.get(OperationDescription("", op_type, version))

    table: dict[tuple[str, int], Callable[..., Any]] = {}
    for (op_type, version), old in ALIASES.items():
        table[op_type, version] = _checked(op_type, version, registered(op_type, old))
    for version in _PAD_VERSIONS:
        table["Pad", version] = _pad_converter(registered("Pad", 13))
    table["Slice", 1] = _slice1_converter
    for op_type, versions in _REDUCE_AXES_INPUT.items():
        for version in versions:
            table[op_type, version] = _reduce_converter
    added = []
    for (op_type, version), converter in table.items():
        if registered(op_type, version) is None:
            add_converter(operation_type=op_type, version=version)(converter)
            added.append((op_type, version))
    log.debug("onnx2torch converters added: %s", added)
    return tuple(added)
