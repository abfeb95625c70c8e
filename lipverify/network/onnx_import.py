"""ONNX files to torch modules, checked against onnxruntime.

onnx2torch converts the graph (an fx GraphModule). Before that, shape computations (`Shape`,
`Gather`, `Concat`... feeding a Reshape or a Pad, as exporters write `x.view(x.size(0), -1)`,
`nn.Unflatten` and `nn.ZeroPad2d`) are folded to constants for the fixed input shape
(`onnx_fold`, onnxslim), and the op versions onnx2torch lacks (opsets 18-21, and a few older ones)
get converters (`onnx_opsets`). Older opsets still missing a converter (e.g. Flatten v1 in the
VNN-COMP 2021 networks) are upgraded with `onnx.version_converter`. The input shape comes from the
graph: a leading dimension that is symbolic or 1 is the batch. Graphs that cannot run on a batch
(rank-1 inputs, a batch of 1 baked into a Reshape) run per sample (`PerSample`). The converted
module must reproduce onnxruntime running the original file on random inputs, else the file is
refused. docs/onnx.md has the whole story.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, version_converter
from torch import fx, nn

from lipverify.errors import ModelError
from lipverify.network._torchvision_compat import import_onnx2torch
from lipverify.network.fx_extract import PerSample
from lipverify.network.layers import Shape
from lipverify.network.onnx_fold import fold_shapes, needs_folding
from lipverify.network.onnx_opsets import refusal, register_converters, rewrite_exact

log = logging.getLogger(__name__)

# The converted module may differ from onnxruntime by this much, relative to max(1, |output|).
ONNX_RTOL = 1e-4
# Opset older graphs are upgraded to when onnx2torch has no converter for one of their ops.
UPGRADE_OPSET = 13
# Relative difference allowed between a batched run and per-sample runs of the converted graph.
BATCH_RTOL = 1e-5
_FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True, eq=False)
class OnnxImport:
    """A converted ONNX model: the module (batch first) and the per-sample input shape.

    `opset` is that of the graph converted (after an upgrade); `folded` says whether its shape
    subgraphs were folded to constants first.
    """

    module: nn.Module
    input_shape: Shape
    opset: int
    upgraded: bool
    folded: bool = False


def _read(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - ValidationError, or truncated external data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: invalid ONNX model ({first})") from exc
    return model


def _check_finite(model: onnx.ModelProto, path: Path) -> None:
    constants = list(model.graph.initializer) + [
        attr.t for node in model.graph.node if node.op_type == "Constant"
        for attr in node.attribute if attr.name == "value"]
    for tensor in constants:
        values = numpy_helper.to_array(tensor)
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            raise ModelError(f"{path}: weight {tensor.name or '(constant)'} contains NaN or "
                             "infinite values")


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _graph_input(model: onnx.ModelProto, path: Path) -> tuple[list[int | None], str]:
    """Dims of the one real graph input (None when unknown or symbolic) and its name."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelError(f"{path}: needs exactly one input and one output, has {len(inputs)} and "
                         f"{len(model.graph.output)}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != _FLOAT:
        raise ModelError(f"{path}: input must be float32, is "
                         f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return dims, inputs[0].name


def _sample_shape(dims: list[int | None], given: Shape | None,
                  path: Path) -> tuple[Shape, bool]:
    """The per-sample input shape and whether the graph's first dimension is the batch."""
    if not dims:
        raise ModelError(f"{path}: the input is a scalar; expected a tensor")
    batch_dim = len(dims) >= 2 and dims[0] in (None, 1)
    graph = dims[1:] if batch_dim else dims
    if given is not None:
        given = tuple(int(s) for s in given)
        known = [(g, d) for g, d in zip(given, graph, strict=False) if d is not None]
        if len(given) != len(graph) or any(g != d for g, d in known):
            raise ModelError(f"{path}: input shape {given} does not fit the graph input "
                             f"{tuple('?' if d is None else d for d in dims)}")
        return given, batch_dim
    if any(d is None or d <= 0 for d in graph):
        raise ModelError(f"{path}: the graph input {tuple('?' if d is None else d for d in dims)}"
                         " has unknown dimensions: give the input shape")
    return tuple(int(d) for d in graph), batch_dim


def _schema_version(op_type: str, opset: int, domain: str) -> int:
    try:
        return int(onnx.defs.get_schema(op_type, opset, domain).since_version)
    except onnx.defs.SchemaError:
        return opset


def _missing_converters(model: onnx.ModelProto) -> list[str]:
    """Each op (with its opset) that has no converter, or one that would not be exact."""
    register_converters()
    from onnx2torch.node_converters.registry import get_converter

    versions = {e.domain or "": int(e.version) for e in model.opset_import}
    versions.setdefault("ai.onnx", versions.get("", 0))
    missing = []
    for node in model.graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        opset = versions.get(domain, versions[""])
        label = f"{node.domain}.{node.op_type} (opset {opset})" if domain else \
            f"{node.op_type} (opset {opset})"
        try:
            get_converter(node.op_type, opset, domain)
        except NotImplementedError:
            missing.append(label)
            continue
        if not domain:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            why = refusal(node.op_type, _schema_version(node.op_type, opset, domain), attrs)
            if why is not None:
                missing.append(f"{label} {why}")
    return sorted(set(missing))


def _fold(model: onnx.ModelProto, shape: Shape, batch_dim: bool,
          path: Path) -> onnx.ModelProto | None:
    """The graph with its shape subgraphs folded for `shape`, or None (nothing to fold)."""
    if not needs_folding(model):
        return None
    fixed: list[int | None] = list(shape)
    if batch_dim:  # symbolic even when the file says 1: a shape chain folds to -1, not 1
        fixed.insert(0, None)
    folded = fold_shapes(model, fixed)
    if folded is not None:
        log.info("%s: shape subgraphs folded (%d nodes -> %d)", path, len(model.graph.node),
                 len(folded.graph.node))
    return folded


def _convert(model: onnx.ModelProto, path: Path) -> tuple[nn.Module, onnx.ModelProto]:
    """onnx2torch's GraphModule, upgrading the opset when a converter is missing."""
    onnx2torch = import_onnx2torch()
    register_converters()
    missing = _missing_converters(model)
    if missing and _opset(model) < UPGRADE_OPSET:
        try:
            upgraded = version_converter.convert_version(model, UPGRADE_OPSET)
        except Exception as exc:  # noqa: BLE001 - the converter's RuntimeError/assertions
            log.debug("opset upgrade failed: %s", exc)
        else:
            if not _missing_converters(upgraded):
                log.info("%s: upgraded from opset %d to %d", path, _opset(model), UPGRADE_OPSET)
                model = upgraded
                missing = []
    if missing:
        raise ModelError(f"{path}: unsupported ONNX op {', '.join(missing)}: no converter to "
                         "torch")
    try:
        module = onnx2torch.convert(model)
    except Exception as exc:  # noqa: BLE001 - a converter refusing an attribute combination
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot convert to torch ({first})") from exc
    return _standard_modules(_inline_sequentials(module)).eval(), model


# onnx2torch's element-wise `OnnxFunction(f)` whose f is a torch activation the layer walk knows
# as a module (Tanh converts to OnnxFunction(torch.tanh)).
_FUNCTION_MODULES: dict[object, type[nn.Module]] = {torch.tanh: nn.Tanh, torch.sigmoid: nn.Sigmoid,
                                                    torch.relu: nn.ReLU}


def _standard_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """onnx2torch modules that compute a torch activation replaced by that torch module."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        kind = _FUNCTION_MODULES.get(getattr(module, "function", None)) \
            if type(module).__name__ == "OnnxFunction" else None
        if kind is not None:
            gm.add_submodule(node.target, kind())
    return gm


def _inline_sequentials(gm: fx.GraphModule) -> fx.GraphModule:
    """Calls of an `nn.Sequential` replaced by calls of its children, in the graph.

    onnx2torch converts a Conv or MaxPool with unequal begin/end pads (the dynamo exporter folds
    a ZeroPad2d into the Conv's pads) to `Sequential(pad, conv)`; inlined, the layer walk sees
    the two modules it maps.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) != 1:
            continue
        seq = gm.get_submodule(node.target)
        if not isinstance(seq, nn.Sequential):
            continue
        with gm.graph.inserting_before(node):
            value = node.args[0]
            for name, _ in seq.named_children():
                value = gm.graph.call_module(f"{node.target}.{name}", (value,))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def _batchable(module: nn.Module, shape: Shape) -> bool:
    """True when the graph runs on a batch of 2 exactly as on each sample alone."""
    x = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            both = module(x).reshape(2, -1)
            each = torch.cat([module(x[i:i + 1]).reshape(1, -1) for i in range(2)])
    except Exception:  # noqa: BLE001 - a batch size baked into the graph
        return False
    scale = 1.0 + float(each.abs().max())
    return both.shape == each.shape and float((both - each).abs().max()) <= BATCH_RTOL * scale


def _compare_with_onnxruntime(model: onnx.ModelProto, module: nn.Module, shape: Shape,
                              batch_dim: bool, path: Path) -> None:
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own loading errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: onnxruntime cannot load it ({first})") from exc
    rng = np.random.default_rng(0)
    x = np.stack([rng.random(shape), rng.standard_normal(shape)]).astype(np.float32)
    name = session.get_inputs()[0].name
    try:
        ref = np.stack([np.asarray(session.run(None, {name: s[None] if batch_dim else s})[0])
                        .reshape(-1) for s in x])
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: onnxruntime fails on an input of shape {shape} "
                         f"({type(exc).__name__})") from exc
    try:
        with torch.no_grad():
            got = module(torch.from_numpy(x)).reshape(len(x), -1).double().numpy()
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: the converted model fails on an input of shape {shape} "
                         f"({type(exc).__name__}: {exc})") from exc
    ref = ref.astype(np.float64)
    if got.shape != ref.shape:
        raise ModelError(f"{path}: converted output shape {got.shape[1:]} differs from "
                         f"onnxruntime's {ref.shape[1:]}")
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    tol = ONNX_RTOL * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    if not err <= tol:
        raise ModelError(f"{path}: the converted model differs from onnxruntime by {err:.3g} "
                         f"(tolerance {tol:.3g})")


def import_onnx(path: str | Path, input_shape: Shape | None = None) -> OnnxImport:
    """Convert an ONNX file to a torch module that takes a batch, checked against onnxruntime."""
    path = Path(path)
    model = _read(path)
    _check_finite(model, path)
    dims, _ = _graph_input(model, path)
    shape, batch_dim = _sample_shape(dims, input_shape, path)
    if math.prod(shape) == 0:
        raise ModelError(f"{path}: the input has no elements")
    folded = _fold(model, shape, batch_dim, path)
    # the folded graph first; the file's own if that fails to convert or to match onnxruntime
    # (a folder bug must not refuse a file that loads without it)
    candidates = [folded, model] if folded is not None else [model]
    first: ModelError | None = None
    for candidate in candidates:
        try:
            module, used = _module(candidate, shape, batch_dim, path)
            _compare_with_onnxruntime(model, module, shape, batch_dim, path)
        except ModelError as exc:
            log.debug("%s: %s", path, exc)
            first = first or exc
            continue
        upgraded = _opset(used) != _opset(model)
        return OnnxImport(module, shape, _opset(used), upgraded, candidate is folded)
    assert first is not None
    raise first


def _module(model: onnx.ModelProto, shape: Shape, batch_dim: bool,
            path: Path) -> tuple[nn.Module, onnx.ModelProto]:
    """The converted graph, batched or per sample, and the graph converted."""
    graph, used = _convert(rewrite_exact(model), path)
    if not batch_dim:
        module: nn.Module = PerSample(graph, batch_dim=False)
    elif _batchable(graph, shape):
        module = graph
    else:
        module = PerSample(graph, batch_dim=True)
    return module.eval(), used
