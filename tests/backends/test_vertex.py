"""`vertex`: CROWN-guided falsification, every counterexample confirmed independently."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lipverify.backends.vertex import VertexBackend
from lipverify.network.load import load_network
from lipverify.types import Perturbation, Problem, Status
from lipverify.vnncomp.vnnlib import read_vnnlib

BENCH = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "vnncomp" / "mnist_fc_2022"
pytestmark = pytest.mark.skipif(VertexBackend().availability() is not None,
                                reason="auto_LiRPA not installed")


def _vnn_problem(net_name: str, prop: str) -> tuple[Problem, object, Path]:
    onnx = BENCH / "onnx" / f"{net_name}.onnx"
    network = load_network(str(onnx))
    [case] = read_vnnlib(BENCH / "vnnlib" / f"{prop}.vnnlib").cases
    shape = (1, *network.input_shape)
    problem = Problem(((case.lower + case.upper) / 2).reshape(shape), (case.prop,),
                      Perturbation.box(case.lower.reshape(shape), case.upper.reshape(shape)))
    return problem, network, onnx


@pytest.mark.skipif(not BENCH.exists(), reason="../shared benchmarks not present")
def test_a_known_sat_instance_is_falsified_at_a_vertex_onnxruntime_confirms():
    problem, network, onnx = _vnn_problem("mnist-net_256x2", "prop_2_0.03")
    [cert] = VertexBackend().certify(network, problem)
    assert cert.status == Status.FALSIFIED
    x = np.array(cert.counterexample, np.float32)
    lower, upper = problem.perturbation.lower.ravel(), problem.perturbation.upper.ravel()
    assert np.all(x >= lower) and np.all(x <= upper)
    session = ort.InferenceSession(str(onnx))
    inp = session.get_inputs()[0]
    y = session.run(None, {inp.name: x.reshape([1, *network.input_shape])})[0].ravel()
    assert problem.properties[0].violated(y.astype(np.float64))
    # every coordinate at a face of the box: the CROWN minimiser is a vertex
    at_face = np.isclose(x, lower, atol=1e-7) | np.isclose(x, upper, atol=1e-7)
    assert at_face.mean() > 0.99


@pytest.mark.skipif(not BENCH.exists(), reason="../shared benchmarks not present")
def test_a_known_unsat_instance_is_never_falsified():
    problem, network, _ = _vnn_problem("mnist-net_256x2", "prop_0_0.03")
    [cert] = VertexBackend().certify(network, problem)
    assert cert.status == Status.UNKNOWN


def test_on_an_affine_net_it_finds_the_exact_worst_point_of_an_l2_ball():
    """For `f(x) = W x + b` CROWN is exact and its minimiser is the ball's worst point, so the
    falsifier succeeds exactly when the true minimum margin `m(x0) - eps ||w_y - w_j||` of some
    pair is negative (closed form, computed here independently)."""
    torch.manual_seed(0)
    hits = misses = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        lin = nn.Linear(4, 3).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
            lin.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        module = nn.Sequential(lin).float()
        network = load_network(module, (4,))
        x = torch.randn(1, 4, generator=g).numpy()
        y = int(np.argmax(network.forward(x)))
        eps = 0.6
        w, b = module[0].weight.detach().double().numpy(), module[0].bias.detach().double().numpy()
        worst = min((w[y] - w[j]) @ x[0].astype(np.float64) + b[y] - b[j]
                    - eps * np.linalg.norm(w[y] - w[j]) for j in range(3) if j != y)
        problem = Problem.robustness(x, [y], 3, Perturbation.ball(2, eps))
        [cert] = VertexBackend().certify(network, problem)
        if worst < -1e-4:
            assert cert.status == Status.FALSIFIED
            assert np.linalg.norm(np.array(cert.counterexample) - x[0]) <= eps
            hits += 1
        elif worst > 1e-4:
            assert cert.status == Status.UNKNOWN
            misses += 1
    assert hits and misses


def test_every_counterexample_on_digits_is_inside_the_ball_and_misclassified():
    from lipverify.data import digits_split
    from lipverify.models import INPUT_SHAPE, load_shipped

    network = load_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    _, _, x, y = digits_split()
    x = x[:40].reshape(40, -1)
    problem = Problem.robustness(x, y[:40], 10, Perturbation.ball("inf", 0.1))
    certs = VertexBackend().certify(network, problem)
    found = [i for i, c in enumerate(certs) if c.status == Status.FALSIFIED]
    assert found
    assert all(c.status == Status.UNKNOWN for c in certs if c.status != Status.FALSIFIED)
    for i in found:
        point = np.array(certs[i].counterexample)
        assert np.max(np.abs(point - x[i])) <= 0.1 + 1e-6
        assert network.forward(point[None]).argmax() != y[i]
