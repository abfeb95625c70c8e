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
