"""Loading torch modules and files: state dicts, TorchScript, pickles (refused unless trusted)."""

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.errors import InputError, ModelError, UnsupportedLayerError
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.layers import Dense, Residual, run_layers
from lipverify.network.load import _layer_mismatch, check_inputs, load_network
from lipverify.network.modules import ResidualBlock


class Payload:
    """Unpickling this runs `os.mkdir(marker)`: what a malicious model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class Custom(nn.Module):
    """Not a Sequential: x.view(x.size(0), -1), a residual block, a matmul with a parameter."""

    input_shape = (2, 3)

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        h = x.view(x.size(0), -1) * 2.0 - 1.0
        h = h + torch.relu(self.fc(h))
        return h @ self.w


def _same(a, b, x):
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def test_module_with_shape_and_inferred_shape():
    net = load_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    assert net.num_outputs == 10 and net.layers is not None and net.name == "Sequential"
    assert load_network(nn.Sequential(nn.Linear(5, 2))).input_shape == (5,)
    assert load_network(Custom()).input_shape == (2, 3)
    with pytest.raises(InputError, match="input_shape"):
        load_network(load_shipped("digits_cnn"))


def test_non_sequential_module_is_traced_and_checked():
    torch.manual_seed(0)
    model = Custom().eval()
    net = load_network(model)
    kinds = [type(layer) for layer in net.layers]
    assert Residual in kinds and kinds[-1] is Dense
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        ref = model.double()(x)
    assert torch.allclose(net.layer_forward(x), ref, atol=1e-10)


def test_unsupported_module_layer_names_it_but_loads():
    class Wavy(nn.Module):
        def forward(self, x):
            return torch.sin(x) + 1

    net = load_network(nn.Sequential(nn.Linear(3, 3), Wavy()), (3,))
    assert net.layers is None and "Wavy" in net.unsupported
    with pytest.raises(UnsupportedLayerError, match="Wavy.*attack, lirpa"):
        net.require_layers()
    assert net.forward(np.zeros((2, 3))).shape == (2, 3)


def test_layer_view_mismatch_is_detected():
    a = nn.Sequential(nn.Linear(3, 2))
    b = nn.Sequential(nn.Linear(3, 2))
    from lipverify.network.extract import extract_layers

    assert _layer_mismatch(a, extract_layers(a, (3,)), (3,)) is None
    assert "differs" in _layer_mismatch(a, extract_layers(b, (3,)), (3,))


def test_state_dict_with_named_architecture(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(load_shipped("digits_mlp").state_dict(), path)
    net = load_network(path, arch="digits_mlp")
    assert net.input_shape == INPUT_SHAPE and net.name == "mlp"
    x = torch.rand(4, *INPUT_SHAPE)
    assert _same(net.module, load_shipped("digits_mlp"), x)
    with pytest.raises(ModelError, match="--arch"):
        load_network(path)
    with pytest.raises(ModelError, match="do not fit"):
        load_network(path, arch="digits_cnn")
    with pytest.raises(ModelError, match="unknown architecture"):
        load_network(path, arch="resnet9000")


def test_state_dict_with_module_function_architecture(tmp_path, monkeypatch):
    (tmp_path / "my_arch.py").write_text(
        "from torch import nn\nINPUT_SHAPE = (4,)\n"
        "def tiny():\n    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    importlib.invalidate_caches()
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    net = load_network(path, arch="my_arch:tiny")
    assert net.input_shape == (4,) and _same(net.module, model.eval(), torch.randn(3, 4))
    with pytest.raises(ModelError, match="cannot import"):
        load_network(path, arch="my_arch:nothing")


def test_torchscript(tmp_path):
    model = load_shipped("digits_cnn")
    path = tmp_path / "cnn.pt"
    torch.jit.script(model).save(str(path))
    net = load_network(path, INPUT_SHAPE)
    assert isinstance(net.module, torch.jit.ScriptModule)
    assert _same(net.module, model, torch.rand(3, *INPUT_SHAPE))
    assert net.num_outputs == 10 and net.layers is not None
    x = torch.rand(3, *INPUT_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(net.layer_forward(x), model.double()(x), atol=1e-10)
    traced = tmp_path / "traced.pt"
    torch.jit.trace(load_shipped("digits_cnn"), torch.zeros(1, *INPUT_SHAPE)).save(str(traced))
    net = load_network(traced, INPUT_SHAPE)
    assert net.forward(np.zeros((1, *INPUT_SHAPE))).shape == (1, 10)
    assert net.layers is not None or "TorchScript" in net.unsupported


def test_full_pickle_needs_trust(tmp_path):
    model = load_shipped("digits_mlp")
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(ModelError, match="trust_pickle"):
        load_network(path, INPUT_SHAPE)
    net = load_network(path, INPUT_SHAPE, trust_pickle=True)
    assert _same(net.module, model, torch.rand(2, *INPUT_SHAPE))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelError, match="arbitrary code"):
        load_network(path, (3,))
    assert not marker.exists()
    # the payload is live: trusting the file runs it (then the file is refused: no module)
    with pytest.raises(ModelError):
        load_network(path, (3,), trust_pickle=True)
    assert marker.exists()


def test_bad_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_network(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="corrupt.pt"):
        load_network(corrupt, (3,))
    good = tmp_path / "good.pt"
    torch.save(load_shipped("digits_mlp").state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ModelError, match="cut.pt"):
        load_network(cut, arch="digits_mlp")
    odd = tmp_path / "model.h5"
    odd.write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown model format"):
        load_network(odd)


def test_nan_and_inf_weights_are_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0, 1] = float("nan")
    with pytest.raises(ModelError, match="0.weight"):
        load_network(model, (3,))
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_var[1] = float("inf")
    with pytest.raises(ModelError, match="running_var"):
        load_network(model, (3,))


def test_check_inputs():
    net = load_network(load_shipped("digits_cnn"), INPUT_SHAPE)
    assert check_inputs(net, np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 1, 8, 8)
    assert check_inputs(net, np.zeros((2, 64))).shape == (2, 1, 8, 8)
    assert check_inputs(net, torch.zeros(1, 1, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(InputError, match=r"\(1, 8, 8\)"):
        check_inputs(net, np.zeros((2, 1, 7, 7)))
    with pytest.raises(InputError, match="floating"):
        check_inputs(net, np.zeros((2, 64), np.int64))
    with pytest.raises(InputError, match="NaN"):
        check_inputs(net, np.full((2, 64), np.nan))


def test_layer_view_of_residual_sequential_matches():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), ResidualBlock(nn.ReLU(), nn.Linear(4, 4)),
                          nn.Linear(4, 2)).eval()
    net = load_network(model)
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(run_layers(net.layers, x), model.double()(x), atol=1e-10)
