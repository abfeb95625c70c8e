"""Networks exported by current torch load at opsets 13-21 and certify as the torch module does.

A zoo of digit-sized nets (MLP, strided padded convolutions, an explicit ZeroPad2d, AvgPool2d with
and without padding, Unflatten and view reshapes, BatchNorm, a residual block) goes through
`torch.onnx.export` (TorchScript exporter at opsets 13, 17, 18, 20, 21; the dynamo exporter where
onnxscript is installed) and back through `load_network`: outputs equal to onnxruntime within
1e-5, a layer view, and the same certify verdicts as the torch module under L2 and L-inf.
"""

import importlib.util
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lipverify
from lipverify.data import load_data
from lipverify.network.load import load_network

SHAPE = (1, 8, 8)
OPSETS = (13, 17, 18, 20, 21)
ORT_TOL = 1e-5
EPS = {"2": (0.02, 0.1, 0.4), "inf": (0.002, 0.01, 0.04)}
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
needs_onnxscript = pytest.mark.skipif(
    not HAS_ONNXSCRIPT, reason="torch.onnx.export(dynamo=True) needs onnxscript, not installed "
    "(pip install onnxscript)")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = h + self.c2(h)
        return self.fc(torch.relu(h).flatten(1))


class Views(nn.Module):
    """x.view(x.size(0), -1), h.view(-1, 4, 4, 4), h.reshape(x.shape[0], -1)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.conv = nn.Conv2d(4, 4, 3)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.view(x.size(0), -1)))
        h = torch.relu(self.conv(h.view(-1, 4, 4, 4)))
        return self.fc2(h.reshape(x.shape[0], -1))


def _batchnorm():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(256, 10))
    gen = torch.Generator().manual_seed(1)
    for bn in (net[1], net[3]):  # exporters fold the first into the Conv and keep the second
        bn.running_mean.copy_(torch.rand(4, generator=gen) - 0.5)
        bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(4, generator=gen) + 0.5)
        bn.bias.data.copy_(torch.rand(4, generator=gen) - 0.5)
    return net


ZOO = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
    "conv_stride_pad": lambda: nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 10)),
    "zeropad": lambda: nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(1, 4, 3, stride=2),
                                     nn.ReLU(), nn.Flatten(), nn.Linear(80, 10)),
    "avgpool": lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                     nn.Flatten(), nn.Linear(64, 10)),
    "avgpool_pad": lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                         nn.AvgPool2d(3, stride=2, padding=1), nn.Flatten(),
                                         nn.Linear(64, 10)),
    "unflatten": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
                                       nn.Unflatten(1, (4, 4, 4)), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                       nn.Flatten(), nn.Linear(16, 10)),
    "views": Views,
    "batchnorm": _batchnorm,
    "residual": Residual,
}
# (exporter, opset, dynamic batch)
LEGACY = [("torchscript", opset, dynamic) for opset in OPSETS for dynamic in (False, True)]
DYNAMO = [("dynamo", 18, False), ("dynamo", 21, True)]


def _module(name):
    torch.manual_seed(sorted(ZOO).index(name))
    return ZOO[name]().eval()


def _export(module, path, exporter, opset, dynamic):
    x = torch.zeros((1, *SHAPE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, opset 21 notes
        if exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
            torch.onnx.export(module, (x,), str(path), opset_version=opset, dynamo=True,
                              dynamic_shapes=shapes, verbose=False)
        else:
            axes = {"x": {0: "batch"}} if dynamic else None
            torch.onnx.export(module, (x,), str(path), opset_version=opset, dynamo=False,
                              input_names=["x"], dynamic_axes=axes)


@pytest.fixture(scope="module")
def data():
    """Twelve digits (1 x 8 x 8, in [0, 1])."""
    return load_data("digits", limit=12)[0]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> (module, its network); and the ONNX file of each (name, exporter, opset, dynamic)."""
    root = tmp_path_factory.mktemp("zoo")
    nets, files = {}, {}

    def net(name):
        if name not in nets:
            module = _module(name)
            # the module as given, and traced: lirpa bounds a plain module itself but a graph
            # (what an ONNX file becomes) through its layer view, and auto_LiRPA 0.3's own
            # AvgPool2d(padding=1) bound is looser than that of the layer view's convolution
            nets[name] = (module, load_network(module, SHAPE),
                          load_network(torch.fx.symbolic_trace(module), SHAPE))
        return nets[name]

    def onnx_file(name, exporter, opset, dynamic):
        key = (name, exporter, opset, dynamic)
        if key not in files:
            path = root / f"{name}_{exporter}_{opset}{'_dyn' if dynamic else ''}.onnx"
            _export(net(name)[0], path, exporter, opset, dynamic)
            files[key] = path
        return files[key]

    return net, onnx_file


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: s[None].astype(np.float32)})[0]
                           for s in x]).astype(np.float64)


def _check_loads(zoo, data, name, exporter, opset, dynamic):
    _, onnx_file = zoo
    path = onnx_file(name, exporter, opset, dynamic)
    net = load_network(path)
    assert net.input_shape == SHAPE
    assert net.layers is not None, net.unsupported
    rng = np.random.default_rng(0)
    x = np.concatenate([data[:4], rng.standard_normal((3, *SHAPE))])
    ref = _ort(path, x)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(net.forward(x) - ref).max() <= ORT_TOL * scale
    layer_out = net.layer_forward(torch.from_numpy(x.astype(np.float32)).double()).numpy()
    assert np.abs(layer_out - ref).max() <= ORT_TOL * scale
    return net


@pytest.mark.parametrize("exporter,opset,dynamic", LEGACY, ids=lambda v: str(v))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_torchscript_export_loads_and_matches_onnxruntime(zoo, data, name, exporter, opset,
                                                           dynamic):
    _check_loads(zoo, data, name, exporter, opset, dynamic)


@needs_onnxscript
@pytest.mark.parametrize("exporter,opset,dynamic", DYNAMO, ids=lambda v: str(v))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_dynamo_export_loads_and_matches_onnxruntime(zoo, data, name, exporter, opset, dynamic):
    _check_loads(zoo, data, name, exporter, opset, dynamic)


def _verdicts(network, x, labels, norm, backend):
    result = lipverify.certify(network, x, labels, EPS[norm], norm=norm, backends=[backend])
    return [[c.status.value for c in result.best[e]] for e in result.eps]


VERDICT_CASES = [("torchscript", 20, True, "spectral"), ("torchscript", 13, False, "lirpa"),
                 ("torchscript", 21, False, "spectral"), ("dynamo", 18, False, "lirpa"),
                 ("dynamo", 21, True, "spectral")]


@pytest.mark.parametrize("exporter,opset,dynamic,backend", VERDICT_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_same_verdicts_as_the_torch_module(zoo, data, name, exporter, opset, dynamic, backend):
    if exporter == "dynamo" and not HAS_ONNXSCRIPT:
        pytest.skip("torch.onnx.export(dynamo=True) needs onnxscript, not installed")
    net, onnx_file = zoo
    module, plain, traced = net(name)
    reference = traced if backend == "lirpa" else plain
    loaded = load_network(onnx_file(name, exporter, opset, dynamic))
    labels = module(torch.from_numpy(data)).argmax(1).numpy()  # robustness of its own labels
    for norm in ("2", "inf"):
        want = _verdicts(reference, data, labels, norm, backend)
        assert _verdicts(loaded, data, labels, norm, backend) == want, norm
