"""Fold an ONNX graph's shape computations to constants for its fixed input shape.

Exporters write `x.view(x.size(0), -1)`, `nn.Unflatten` and `nn.ZeroPad2d` as small graphs on
`Shape`, `Gather`, `Concat`, `ConstantOfShape`, `Slice`, `Cast`... that compute a Reshape target
or Pad amounts. For a fixed per-sample input shape these are constants; folding them leaves the
layers a verifier reads (`Reshape(x, [-1, 196])`, `Pad(x, [0, 0, 0, 1, ...])`).

The folder is onnxslim (see docs/onnx.md for why) with only its passes that keep the function
exact: constant folding (evaluated by onnxruntime, the engine the file is checked against),
dead-node elimination (Identity, Dropout, zero Pad, `x * 1`, `x + 0`...) and common
subexpression elimination. Its graph fusions (Conv+BatchNorm, Pad+Conv, MatMul+Add) are off:
they rewrite weights in float32, and lipverify folds those itself in float64. A symbolic batch
dimension stays symbolic (onnxslim's symbolic shape inference writes it as -1 in a Reshape), so
a graph exported with a dynamic batch still runs on batches.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import onnx

log = logging.getLogger(__name__)

# onnxslim passes left out: they change weights in float32 or only merge equal initializers.
SKIPPED_PASSES = ("graph_fusion", "weight_tying")
# Ops folding always has work on: shapes (constants once the input shape is fixed), and Dropout
# (the identity at inference; from opset 12 its ratio is an input onnx2torch keeps as a module).
FOLDED_OPS = frozenset({"Shape", "Size", "Dropout"})
BATCH_NAME = "batch"


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer}
    names.add("")  # an omitted optional input
    for node in model.graph.node:
        if node.op_type == "Constant":
            names.update(node.output)
    return names


def needs_folding(model: onnx.ModelProto) -> bool:
    """True when a node reads a shape, is a Dropout or computes from constants only."""
    known = _constants(model)
    for node in model.graph.node:
        if node.op_type in FOLDED_OPS:
            return True
        if node.op_type != "Constant" and node.input and all(i in known for i in node.input):
            return True
    return False


def with_input_shape(model: onnx.ModelProto, dims: Sequence[int | None]) -> onnx.ModelProto:
    """A copy whose one graph input has `dims` (None: a symbolic batch), stale shapes dropped."""
    model = copy.deepcopy(model)
    weights = {init.name for init in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in weights)
    shape = graph_input.type.tensor_type.shape
    old = list(shape.dim)
    del shape.dim[:]
    for i, size in enumerate(dims):
        dim = shape.dim.add()
        if size is not None:
            dim.dim_value = int(size)
        else:
            dim.dim_param = old[i].dim_param if i < len(old) and old[i].dim_param else BATCH_NAME
    del model.graph.value_info[:]  # recomputed for the fixed shape
    return model


def fold_shapes(model: onnx.ModelProto, dims: Sequence[int | None]) -> onnx.ModelProto | None:
    """`model` with its constant and shape subgraphs folded for input `dims`, or None.

    None when onnxslim is not installed or fails on the graph (the caller converts the graph as
    it is). The result is not checked here: the loader checks the converted module against
    onnxruntime running the original file.
    """
    try:
        import onnxslim
    except ImportError:
        log.info("onnxslim is not installed: shape subgraphs are not folded")
        return None
    fixed = with_input_shape(model, dims)
    try:
        folded = onnxslim.slim(fixed, skip_optimizations=list(SKIPPED_PASSES))
    except Exception as exc:  # noqa: BLE001 - onnxslim's shape inference or folding giving up
        log.info("onnxslim could not fold the graph (%s: %s)", type(exc).__name__, exc)
        return None
    if not isinstance(folded, onnx.ModelProto):
        return None
    return folded
