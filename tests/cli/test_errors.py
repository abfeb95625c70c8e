"""Bad input gives a one-line error naming the problem and a non-zero exit, no traceback."""

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.cli.main import main


def _fails(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.fixture
def npz(tmp_path):
    def make(name="d.npz", **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        return str(path)
    return make


def test_missing_model(capsys, tmp_path):
    _fails(capsys, ["certify", "--model", str(tmp_path / "nope.onnx")], "not found")


def test_corrupt_and_truncated_onnx(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf")
    _fails(capsys, ["certify", "--model", str(bad)], "bad.onnx")
    src = "/work/shared/benchmarks/vnncomp/test_2021/onnx/test_small.onnx"
    import os

    if os.path.exists(src):
        data = open(src, "rb").read()
        cut = tmp_path / "cut.onnx"
        cut.write_bytes(data[: len(data) // 2])
        _fails(capsys, ["certify", "--model", str(cut)], "cut.onnx")


def test_unsupported_layer_names_it(capsys, tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    # a full pickled module is refused without --trust-pickle
    _fails(capsys, ["certify", "--model", str(path)], "trust-pickle")


def test_npz_without_arrays(capsys, npz):
    _fails(capsys, ["certify", "--data", npz(a=np.zeros(3))], "missing array")


def test_wrong_dtype_and_labels(capsys, npz):
    x = np.zeros((4, 1, 8, 8), np.float32)
    _fails(capsys, ["certify", "--data", npz(x=x, y=np.zeros(4, np.float32)),
                    "--backends", "spectral"], "integer")
    _fails(capsys, ["certify", "--data", npz(x=x, y=np.array([0, 1, 2, 12])),
                    "--backends", "spectral"], "labels")
    _fails(capsys, ["certify", "--data", npz(x=np.zeros((4, 3, 8, 8), np.float32),
                                             y=np.zeros(4, np.int64)),
                    "--backends", "spectral"], "shape")


@pytest.mark.parametrize("eps", ["-0.1", "0", "nan", "inf", "abc"])
def test_bad_eps(capsys, eps):
    with pytest.raises(SystemExit) as exc:
        main(["certify", "--eps", eps])
    assert exc.value.code != 0
    assert "eps" in capsys.readouterr().err


def test_unknown_backend(capsys):
    _fails(capsys, ["certify", "--backends", "nosuch", "--limit", "2"], "nosuch")


def test_malformed_yaml(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eps: [0.1\n")
    _fails(capsys, ["certify", str(cfg)], "yaml")
    cfg.write_text("modle: x\n")
    _fails(capsys, ["certify", str(cfg)], "modle")


def _state_dict_with(tmp_path, key, value):
    """The shipped digits MLP saved as a state dict with one entry of `key` set to `value`."""
    from lipverify.models import load_shipped

    state = load_shipped("digits_mlp").state_dict()
    state[key] = state[key].clone()
    state[key].view(-1)[3] = value
    path = tmp_path / f"bad_{key.replace('.', '_')}.pt"
    torch.save(state, path)
    return str(path)


def _onnx_with(tmp_path, value):
    """A 64-10 Gemm ONNX model (digits-sized input) with one weight set to `value`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    w[2, 5] = value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(10, np.float32),
                                                                      "b")]
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "g",
                              [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused(capsys, tmp_path, value):
    """NaN or infinite weights: certify and lipschitz name the weight, exit 1, no traceback."""
    weight = _state_dict_with(tmp_path, "3.weight", value)
    bias = _state_dict_with(tmp_path, "5.bias", value)
    onnx_path = _onnx_with(tmp_path, value)
    for path, key in ((weight, "3.weight"), (bias, "5.bias")):
        _fails(capsys, ["certify", "--model", path, "--arch", "digits_mlp", "--backends",
                        "spectral", "--limit", "2", "--no-progress"], f"weight {key} contains "
               "NaN or infinite values")
        _fails(capsys, ["lipschitz", path, "--arch", "digits_mlp"], f"weight {key} contains NaN")
    _fails(capsys, ["certify", "--model", onnx_path, "--input-shape", "64", "--backends",
                    "spectral", "--limit", "2", "--no-progress"],
           "weight W contains NaN or infinite")
    _fails(capsys, ["lipschitz", onnx_path], "weight W contains NaN")
