"""ONNX loading: every shared benchmark network against onnxruntime, and the refusals."""

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lipverify.errors import InputError, ModelError, UnsupportedLayerError
from lipverify.network.fx_extract import PerSample
from lipverify.network.layers import Conv, Dense, Reshape, Residual, Shift
from lipverify.network.load import check_inputs, load_network
from lipverify.network.onnx_import import _compare_with_onnxruntime, import_onnx

BENCH = Path("/work/shared/benchmarks")
SHARED = sorted(BENCH.glob("vnncomp/*/onnx/*.onnx")) + sorted(BENCH.glob("l2_sdpcrown/*.onnx"))
needs_bench = pytest.mark.skipif(not SHARED, reason="shared benchmarks not present")


@pytest.fixture(scope="module")
def shared():
    """Each shared network loaded once for this module."""
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = load_network(path)
        return cache[path]

    return get


def _ort_outputs(path, x, batch_dim):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.stack([session.run(None, {name: s[None] if batch_dim else s})[0].reshape(-1)
                     for s in x.astype(np.float32)]).astype(np.float64)


@needs_bench
@pytest.mark.parametrize("path", SHARED, ids=lambda p: p.name)
def test_shared_networks_load_and_layer_view_matches_onnxruntime(path, shared):
    net = shared(path)
    assert net.layers is not None, net.unsupported
    graph_input = onnx.load(str(path)).graph.input[-1]
    batch_dim = len(graph_input.type.tensor_type.shape.dim) >= 2
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.random((3, *net.input_shape)),
                        rng.standard_normal((2, *net.input_shape))])
    ref = _ort_outputs(path, x, batch_dim)
    scale = 1 + np.abs(ref).max()
    assert np.abs(net.forward(x) - ref).max() <= 1e-4 * scale
    # the float64 layer view of the float32 weights: only float32 rounding separates it from ORT
    got = net.layer_forward(torch.from_numpy(x.astype(np.float32)).double()).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * scale


@needs_bench
def test_vnncomp_2021_old_opset_converts_at_its_own_opset():
    """Flatten-1 (opset 8) has an exact converter now (Flatten-9's), so no opset upgrade."""
    imported = import_onnx(BENCH / "vnncomp/test_2021/onnx/test_sat.onnx")
    assert not imported.upgraded and imported.opset == 8
    assert imported.input_shape == (1, 1, 5)


@needs_bench
def test_rank_one_graphs_run_per_sample():
    net = load_network(BENCH / "vnncomp/test_2021/onnx/test_small.onnx")
    assert isinstance(net.module, PerSample) and net.input_shape == (1,)
    x = np.linspace(-2, 2, 9)[:, None]
    assert np.allclose(net.forward(x),
                       _ort_outputs(BENCH / "vnncomp/test_2021/onnx/test_small.onnx", x, False))


@needs_bench
@pytest.mark.parametrize("name,padded", [("cifar10_cnn_a", True), ("cifar10_convdeep", True),
                                         ("cifar10_cnn_c", False),
                                         ("cifar10_convsmall", False)])
def test_cifar_normalisation_is_folded(name, padded, shared):
    """Sub mean / Div 0.225 then a convolution: the scale goes into the kernel; the mean into the
    bias when there is no padding, else it stays a Shift of exactly -mean (an isometry)."""
    path = BENCH / f"l2_sdpcrown/{name}.onnx"
    net = shared(path)
    kernels = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if len(t.dims) == 4 and t.dims[2] > 1]
    conv = next(layer for layer in net.layers if isinstance(layer, Conv))
    assert np.allclose(conv.weight.numpy(), kernels[0].astype(np.float64) / np.float32(0.225),
                       rtol=1e-6)
    first = net.layers[0]
    if padded:
        mean = np.array([125.3, 123.0, 113.9]) / 255
        assert isinstance(first, Shift)
        assert np.allclose(first.shift.numpy(), -mean[:, None, None] * np.ones((3, 32, 32)),
                           atol=1e-6)
    else:
        assert first is conv
    assert not any(isinstance(layer, Shift) for layer in net.layers[1:])


def _model(nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _fc_model(weight, bias, act=None, batch="N"):
    """x (batch, n) -> Gemm(W, b) [-> act]."""
    n = weight.shape[1]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, weight.shape[0]])
    inits = [numpy_helper.from_array(weight.astype(np.float32), "W"),
             numpy_helper.from_array(bias.astype(np.float32), "b")]
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h" if act else "y"], transB=1)]
    if act:
        nodes.append(helper.make_node(act, ["h"], ["y"]))
    return _model(nodes, [x], [y], inits)


def test_dynamic_batch_gemm(tmp_path):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 4)), rng.standard_normal(3)
    net = load_network(_save(tmp_path, _fc_model(w, b, "Relu")))
    assert net.input_shape == (4,) and net.num_outputs == 3
    assert not isinstance(net.module, PerSample)
    assert isinstance(net.layers[0], Dense)
    assert np.allclose(net.layers[0].weight.numpy(), w.astype(np.float32))
    x = rng.standard_normal((5, 4))
    w32, b32 = w.astype(np.float32), b.astype(np.float32)
    assert np.allclose(net.forward(x), np.maximum(x @ w32.T + b32, 0), atol=1e-5)


def test_batch_of_one_baked_into_reshape_runs_per_sample(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 2)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    inits = [numpy_helper.from_array(np.array([1, 6], np.int64), "shape"),
             numpy_helper.from_array(w, "W")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"])]
    net = load_network(_save(tmp_path, _model(nodes, [x], [y], inits)))
    assert isinstance(net.module, PerSample) and net.input_shape == (2, 3)
    assert [type(layer) for layer in net.layers] == [Reshape, Dense]
    xs = rng.standard_normal((4, 2, 3))
    assert np.allclose(net.forward(xs), xs.reshape(4, 6) @ w, atol=1e-5)


def test_residual_pad_and_normalisation_graph(tmp_path):
    """x - m, / s, Pad, Conv, Relu, Conv(same) + skip, Flatten, Gemm."""
    rng = np.random.default_rng(2)
    f = np.float32
    inits = [numpy_helper.from_array(np.array([0.5, 0.25], f).reshape(1, 2, 1, 1), "m"),
             numpy_helper.from_array(np.array([0.2], f), "s"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(f), "K1"),
             numpy_helper.from_array(rng.standard_normal(3).astype(f), "c1"),
             numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(f), "K2"),
             numpy_helper.from_array(rng.standard_normal((4, 3 * 5 * 5)).astype(f), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(f), "b")]
    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]),
             helper.make_node("Div", ["a", "s"], ["n"]),
             helper.make_node("Pad", ["n", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "K1", "c1"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "K2"], ["d"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["r", "d"], ["skip"]),
             helper.make_node("Flatten", ["skip"], ["fl"]),
             helper.make_node("Gemm", ["fl", "W", "b"], ["y"], transB=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    path = _save(tmp_path, _model(nodes, [x], [y], inits))
    net = load_network(path)
    kinds = [type(layer) for layer in net.layers]
    assert kinds.count(Residual) == 1 and Shift in kinds and kinds.count(Conv) == 1
    conv = next(layer for layer in net.layers if isinstance(layer, Conv))
    assert conv.padding == (1, 1, 1, 1)  # the explicit Pad folded into the convolution
    xs = rng.standard_normal((3, 2, 5, 5))
    ref = _ort_outputs(path, xs, True)
    assert np.allclose(net.layer_forward(torch.from_numpy(xs)).numpy(), ref, atol=1e-4)


def test_normalisation_before_flatten_folds_into_dense(tmp_path):
    f = np.float32
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(np.array([0.1, 0.2], f).reshape(1, 2, 1, 1), "m"),
             numpy_helper.from_array(np.array([0.3, 0.5], f).reshape(1, 2, 1, 1), "s"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(f), "W")]
    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]),
             helper.make_node("Div", ["a", "s"], ["n"]),
             helper.make_node("Flatten", ["n"], ["fl"]),
             helper.make_node("MatMul", ["fl", "W"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    net = load_network(_save(tmp_path, _model(nodes, [x], [y], inits)))
    assert [type(layer) for layer in net.layers] == [Reshape, Dense]


def test_unconvertible_op_is_refused_by_name(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    path = _save(tmp_path, _model([helper.make_node("Hardmax", ["x"], ["y"])], [x], [y]))
    with pytest.raises(ModelError, match="Hardmax"):
        load_network(path)


@pytest.mark.parametrize("op,attrs", [("Sin", {}), ("Softmax", {"axis": 1}),
                                      ("MaxPool", {"kernel_shape": [1]})])
def test_op_without_layer_view_loads_and_names_the_op(tmp_path, op, attrs):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 4))
    model = _fc_model(w, np.zeros(3))
    model.graph.node[0].output[0] = "h"
    shape_in = "h"
    if op == "MaxPool":  # needs (N, C, L)
        model.graph.node.append(helper.make_node("Unsqueeze", ["h", "axes"], ["h3"]))
        model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        model.graph.node.append(helper.make_node(op, ["h3"], ["h4"], **attrs))
        model.graph.node.append(helper.make_node("Flatten", ["h4"], ["y"]))
    else:
        model.graph.node.append(helper.make_node(op, [shape_in], ["y"], **attrs))
    net = load_network(_save(tmp_path, model))
    assert net.layers is None
    assert op.lower() in net.unsupported.lower()
    with pytest.raises(UnsupportedLayerError, match="attack") as info:
        net.require_layers()
    assert op.lower() in str(info.value).lower()
    x = rng.standard_normal((2, 4))  # the module itself still runs
    assert net.forward(x).shape == (2, 3)


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_network(tmp_path / "nope.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="corrupt.onnx"):
        load_network(corrupt)
    whole = _fc_model(np.ones((3, 40)), np.zeros(3)).SerializeToString()
    for cut in (len(whole) // 2, len(whole) - 3):
        truncated = tmp_path / f"cut{cut}.onnx"
        truncated.write_bytes(whole[:cut])
        with pytest.raises(ModelError, match=f"cut{cut}.onnx"):
            load_network(truncated)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError):
        load_network(empty)


def test_nan_weights_are_refused(tmp_path):
    w = np.ones((3, 4))
    w[1, 2] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        load_network(_save(tmp_path, _fc_model(w, np.zeros(3))))


def test_mismatch_with_onnxruntime_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 4))
    model = _fc_model(w, np.zeros(3))
    other = torch.nn.Linear(4, 3)
    with torch.no_grad():
        other.weight.copy_(torch.from_numpy(w * (1 + 1e-2)))
        other.bias.zero_()
    with pytest.raises(ModelError, match="differs from onnxruntime"):
        _compare_with_onnxruntime(model, other, (4,), True, tmp_path / "m.onnx")
    with torch.no_grad():
        other.weight.copy_(torch.from_numpy(w))
    _compare_with_onnxruntime(model, other, (4,), True, tmp_path / "m.onnx")  # the same: passes


def test_input_shape_from_graph_and_checks(tmp_path):
    net = load_network(_save(tmp_path, _fc_model(np.ones((2, 6)), np.zeros(2), batch=1)))
    assert net.input_shape == (6,)
    with pytest.raises(ModelError, match="does not fit"):
        load_network(_save(tmp_path, _fc_model(np.ones((2, 6)), np.zeros(2)), "b.onnx"),
                     input_shape=(5,))
    assert check_inputs(net, np.zeros((3, 6))).shape == (3, 6)
    with pytest.raises(InputError, match=r"\(6,\)"):
        check_inputs(net, np.zeros((3, 5)))


def test_unknown_dimension_needs_an_input_shape(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])
    path = _save(tmp_path, _model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]))
    with pytest.raises(ModelError, match="unknown dimensions"):
        load_network(path)
    net = load_network(path, input_shape=(5,))
    assert net.input_shape == (5,) and math.prod(net.input_shape) == net.num_outputs


def test_exported_dynamic_flatten_pattern(tmp_path):
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as torch exports x.view(x.size(0), -1)."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(rng.standard_normal((2, 12)).astype(np.float32), "W")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Concat", ["b1", "minus_one"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W"], ["y"], transB=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    path = _save(tmp_path, _model(nodes, [x], [y], inits))
    net = load_network(path)
    assert [type(layer) for layer in net.layers] == [Reshape, Dense]
    xs = rng.standard_normal((3, 3, 2, 2))
    assert np.allclose(net.layer_forward(torch.from_numpy(xs)).numpy(),
                       _ort_outputs(path, xs, True), atol=1e-5)
