"""Each op lipverify can bound, and the ops of exported shape computations, at opsets 7-21.

One small graph per op (in the form its opset defines: Pad's pads an attribute before 11 and an
input after, Squeeze's axes an input from 13, Reduce's from 18...) is loaded by `load_network`;
its outputs must equal onnxruntime's within 1e-5, and ops the layer view maps must have one.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipverify.errors import ModelError
from lipverify.network.load import load_network
from lipverify.network.onnx_import import import_onnx
from lipverify.network.onnx_opsets import ALIASES, register_converters

OPSETS = range(7, 22)
ORT_TOL = 1e-5
F = np.float32
RNG = np.random.default_rng(0)
X_IMAGE = ["N", 2, 5, 5]


def _arr(name, values, dtype=F):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _w(name, shape):
    return _arr(name, RNG.standard_normal(shape))


def _ints(name, values):
    return _arr(name, values, np.int64)


def _pad(opset, pads):
    """Pad x by `pads` (ONNX order), in the form of `opset`."""
    if opset < 11:
        return [helper.make_node("Pad", ["x"], ["y"], pads=pads)], [], None
    return [helper.make_node("Pad", ["x", "pads"], ["y"])], [_ints("pads", pads)], None


def _axes_op(op, opset, axes, since=13, **attrs):
    """Squeeze/Unsqueeze/ReduceMean: axes an attribute before `since`, an input from it."""
    if opset < since:
        return [helper.make_node(op, ["x"], ["y"], axes=axes, **attrs)], []
    return [helper.make_node(op, ["x", "axes"], ["y"], **attrs)], [_ints("axes", axes)]


def _case(op, opset):
    """(nodes, initializers, input dims) of a graph computing `op`; None: not at this opset."""
    image, flat = X_IMAGE, ["N", 6]
    if op == "Gemm":
        return ([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)],
                [_w("W", (3, 6)), _w("b", (3,))], flat)
    if op == "MatMul":
        return [helper.make_node("MatMul", ["x", "W"], ["y"])], [_w("W", (6, 3))], flat
    if op in ("Add", "Sub", "Mul", "Div"):
        c = RNG.uniform(0.5, 2.0, (1, 2, 1, 1))
        return [helper.make_node(op, ["x", "c"], ["y"])], [_arr("c", c)], image
    if op == "Conv":
        return ([helper.make_node("Conv", ["x", "K", "b"], ["y"], pads=[1, 1, 1, 1],
                                  strides=[2, 2])], [_w("K", (3, 2, 3, 3)), _w("b", (3,))], image)
    if op == "Conv_uneven_pads":  # as the dynamo exporter folds a ZeroPad2d into the Conv
        return ([helper.make_node("Conv", ["x", "K"], ["y"], pads=[0, 1, 1, 2], strides=[2, 1])],
                [_w("K", (3, 2, 3, 3))], image)
    if op == "ConvTranspose":
        return ([helper.make_node("ConvTranspose", ["x", "K"], ["y"], strides=[2, 2])],
                [_w("K", (2, 3, 3, 3))], image)
    if op in ("Relu", "Sigmoid", "Tanh"):
        return [helper.make_node(op, ["x"], ["y"])], [], image
    if op == "LeakyRelu":
        return [helper.make_node(op, ["x"], ["y"], alpha=0.1)], [], image
    if op == "Pad":
        nodes, inits, _ = _pad(opset, [0, 0, 1, 0, 0, 0, 0, 2])
        return nodes, inits, image
    if op == "Pad_axes":
        if opset < 18:
            return None
        return ([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"])],
                [_ints("pads", [1, 0, 0, 2]), _ints("axes", [2, -1])], image)
    if op == "AveragePool":
        return [helper.make_node(op, ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], [], image
    if op == "AveragePool_pads":
        return ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                  strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)],
                [], image)
    if op == "MaxPool":
        return [helper.make_node(op, ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], [], image
    if op == "BatchNormalization":
        inits = [_arr("s", RNG.uniform(0.5, 1.5, 2)), _w("B", (2,)), _w("m", (2,)),
                 _arr("v", RNG.uniform(0.5, 2.0, 2))]
        return [helper.make_node(op, ["x", "s", "B", "m", "v"], ["y"], epsilon=1e-3)], inits, image
    if op == "Flatten":
        return [helper.make_node(op, ["x"], ["y"], axis=1)], [], image
    if op == "Reshape":
        return [helper.make_node(op, ["x", "s"], ["y"])], [_ints("s", [-1, 10, 5])], image
    if op == "Reshape_allowzero":
        if opset < 14:
            return None
        return ([helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)],
                [_ints("s", [-1, 50])], image)
    if op == "Transpose":
        return [helper.make_node(op, ["x"], ["y"], perm=[0, 1, 3, 2])], [], image
    if op == "Squeeze":
        nodes, inits = _axes_op(op, opset, [2])
        return nodes, inits, ["N", 2, 1, 5]
    if op == "Unsqueeze":
        nodes, inits = _axes_op(op, opset, [2])
        return nodes, inits, image
    if op == "Slice":  # on the data: loads, no layer view
        if opset < 10:
            return ([helper.make_node(op, ["x"], ["y"], starts=[1], ends=[4], axes=[2])], [],
                    image)
        return ([helper.make_node(op, ["x", "st", "en", "ax"], ["y"])],
                [_ints("st", [1]), _ints("en", [4]), _ints("ax", [2])], image)
    if op == "Gather":
        return ([helper.make_node(op, ["x", "i"], ["y"], axis=3)], [_ints("i", [0, 2, 4])],
                image)
    if op == "Identity":
        return [helper.make_node(op, ["x"], ["y"])], [], image
    if op == "Cast":
        return [helper.make_node(op, ["x"], ["y"], to=TensorProto.FLOAT)], [], image
    if op == "Constant":
        value = helper.make_tensor("v", TensorProto.FLOAT, [1, 2, 1, 1], [0.5, -1.0])
        return ([helper.make_node(op, [], ["c"], value=value),
                 helper.make_node("Add", ["x", "c"], ["y"])], [], image)
    if op == "Dropout":  # the ratio an attribute before 12, an input from 12; then a Relu
        relu = helper.make_node("Relu", ["d"], ["y"])
        if opset < 12:
            return [helper.make_node(op, ["x"], ["d"], ratio=0.3), relu], [], image
        return [helper.make_node(op, ["x", "r"], ["d"]), relu], [_arr("r", 0.3)], image
    if op == "ReduceMean":
        nodes, inits = _axes_op(op, opset, [2, 3], since=18, keepdims=0)
        return nodes, inits, image
    if op == "Shape_chain":  # x.view(x.size(0), -1): Shape, Gather, Unsqueeze, Concat, Reshape
        unsq, axes = _axes_op("Unsqueeze", opset, [0])
        unsq[0].input[0], unsq[0].output[0] = "b", "b1"
        return ([helper.make_node("Shape", ["x"], ["s"]),
                 helper.make_node("Gather", ["s", "zero"], ["b"], axis=0), *unsq,
                 helper.make_node("Concat", ["b1", "minus_one"], ["t"], axis=0),
                 helper.make_node("Reshape", ["x", "t"], ["y"])],
                [_ints("zero", 0), _ints("minus_one", [-1]), *axes], image)
    if op == "Pad_chain":  # computed pads: ConstantOfShape, Concat, Cast, Slice, Identity, Pad
        if opset < 11:
            return None
        zeros = helper.make_tensor("z", TensorProto.INT32, [1], [0])
        return ([helper.make_node("ConstantOfShape", ["n"], ["zeros"], value=zeros),
                 helper.make_node("Concat", ["zeros", "tail"], ["p32"], axis=0),
                 helper.make_node("Cast", ["p32"], ["p64"], to=TensorProto.INT64),
                 helper.make_node("Slice", ["p64", "st", "en"], ["p"]),
                 helper.make_node("Identity", ["p"], ["pads"]),
                 helper.make_node("Pad", ["x", "pads"], ["y"])],
                [_ints("n", [4]), _arr("tail", [0, 0, 1, 2, 0], np.int32), _ints("st", [0]),
                 _ints("en", [8])], image)
    raise AssertionError(op)


BOUNDED = ("Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Conv", "Conv_uneven_pads", "Relu",
           "LeakyRelu", "Sigmoid", "Tanh", "Pad", "Pad_axes", "AveragePool", "AveragePool_pads",
           "BatchNormalization", "Flatten", "Reshape", "Reshape_allowzero", "Transpose",
           "Squeeze", "Unsqueeze", "Identity", "Constant", "Dropout", "Shape_chain", "Pad_chain")
LOADS_ONLY = ("ConvTranspose", "MaxPool", "Slice", "Gather", "Cast", "ReduceMean")


def _model(op, opset):
    case = _case(op, opset)
    if case is None:
        return None, None
    nodes, inits, dims = case
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, op, [x], [y], inits)
    opsets = [helper.make_opsetid("", opset)]
    # IR 4 at least: before it initializers had to be graph inputs too
    ir_version = max(4, helper.find_min_ir_version_for(opsets))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    out = _ort(model, np.zeros((1, *dims[1:]), F), flat=False)
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out.shape[1:]]))
    onnx.checker.check_model(model, full_check=True)
    return model, tuple(dims[1:])


def _ort(model, x, flat=True):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = [session.run(None, {"x": s[None]})[0] for s in x.astype(F)]
    return np.concatenate([o.reshape(1, -1) if flat else o for o in out]).astype(np.float64)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op", BOUNDED + LOADS_ONLY)
def test_op_loads_at_every_opset(tmp_path, op, opset):
    model, shape = _model(op, opset)
    if model is None:
        pytest.skip(f"{op} has no such form at opset {opset}")
    path = tmp_path / f"{op}_{opset}.onnx"
    onnx.save(model, str(path))
    net = load_network(path)
    x = np.concatenate([RNG.random((2, *shape)), RNG.standard_normal((2, *shape))])
    ref = _ort(model, x)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(net.forward(x).reshape(len(x), -1) - ref).max() <= ORT_TOL * scale
    if op in BOUNDED:
        assert net.layers is not None, net.unsupported
        got = net.layer_forward(torch.from_numpy(x.astype(F)).double()).numpy()
        assert np.abs(got.reshape(len(x), -1) - ref).max() <= ORT_TOL * scale


def test_shape_subgraphs_are_folded(tmp_path):
    model, _ = _model("Pad_chain", 20)
    onnx.save(model, str(tmp_path / "m.onnx"))
    imported = import_onnx(tmp_path / "m.onnx")
    assert imported.folded and not imported.upgraded and imported.opset == 20
    kinds = {type(m).__name__ for m in imported.module.modules()}
    assert not kinds & {"OnnxConstantOfShape", "OnnxCast", "OnnxConcat", "OnnxSlice"}


@pytest.mark.parametrize("op,opset,attrs,message", [
    ("AveragePool", 19, {"dilations": [2, 2]}, r"AveragePool \(opset 19\) with dilations"),
    ("Pad", 19, {"mode": "wrap"}, r"Pad \(opset 19\) with mode 'wrap'"),
])
def test_inexact_new_attributes_are_refused_by_name(tmp_path, op, opset, attrs, message):
    model, _ = _model(op, opset)
    model.graph.node[0].attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelError, match=message):
        load_network(tmp_path / "m.onnx")


def test_aliases_only_where_onnx2torch_has_no_converter_and_the_schema_exists():
    register_converters()
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    for (op, version), old in ALIASES.items():
        assert onnx.defs.get_schema(op, version).since_version == version
        assert OperationDescription("", op, old) in _CONVERTER_REGISTRY
        assert onnx.defs.get_schema(op, old).since_version in (old, 1)  # Slice-1 is onnx2torch's 9


def test_old_opset_without_converter_is_still_upgraded(tmp_path):
    """Max-6 (opset 7) has no converter and no alias: onnx's version converter takes it to 13."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Max", ["x", "c"], ["y"])], "g", [x], [y],
                              [_arr("c", np.zeros((1, 4)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=4)
    onnx.save(model, str(tmp_path / "m.onnx"))
    imported = import_onnx(tmp_path / "m.onnx")
    assert imported.upgraded and imported.opset == 13


def test_a_folded_graph_that_does_not_match_falls_back_to_the_file(tmp_path, monkeypatch):
    """A folder bug (here: a weight changed) must not change what loads: the file's graph does."""
    import lipverify.network.onnx_import as onnx_import

    model, shape = _model("Pad_chain", 13)
    model.graph.node.append(helper.make_node("Conv", ["y", "K"], ["z"]))
    model.graph.initializer.append(_w("K", (3, 2, 3, 3)))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT,
                                                                 ["N", 3, 4, 5]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    real = onnx_import.fold_shapes

    def broken(graph, dims):
        folded = real(graph, dims)
        weight = next(t for t in folded.graph.initializer if t.name == "K")
        weight.CopyFrom(_arr("K", numpy_helper.to_array(weight) * 1.01))
        return folded

    monkeypatch.setattr(onnx_import, "fold_shapes", broken)
    imported = import_onnx(tmp_path / "m.onnx")
    assert not imported.folded
    x = RNG.standard_normal((2, *shape))
    ref = _ort(model, x)
    with torch.no_grad():
        got = imported.module(torch.from_numpy(x.astype(F))).reshape(2, -1).double().numpy()
    assert np.abs(got - ref).max() <= ORT_TOL * max(1.0, float(np.abs(ref).max()))
