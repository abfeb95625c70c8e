"""The PGD falsifier: finds violations that exist (known by construction, LP or VNN-COMP), never
reports one that a float32 and a float64 forward pass do not both confirm."""

import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from lipverify.backends.attack import AttackBackend, AttackOptions
from lipverify.data import digits_split
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.load import load_network
from lipverify.types import Norm, Perturbation, Problem, Property, Status

TEST_2021 = Path("/work/shared/benchmarks/vnncomp/test_2021")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run faster on one thread (and far faster on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _read_box(path):
    """The input box of a VNN-LIB file written as `(assert (<= X_i v))`, read by hand."""
    text = path.read_text()
    n = len(re.findall(r"declare-const X_\d+", text))
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    for op, i, v in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-+\d.eE]+)\)\)", text):
        (hi if op == "<=" else lo)[int(i)] = float(v)
    return lo, hi


def _prop_3():
    """ACAS Xu property 3 as in test_prop.vnnlib: violated when Y_0 <= Y_i for all i."""
    c = np.zeros((4, 5))
    c[:, 0] = 1
    c[np.arange(4), np.arange(1, 5)] = -1
    return Property.linear([(c, np.zeros(4))], 5)


def _box_problem(lo, hi, prop, shape):
    lower, upper = lo.reshape(1, *shape), hi.reshape(1, *shape)
    return Problem((lower + upper) / 2, (prop,), Perturbation.box(lower, upper))


@pytest.mark.skipif(not TEST_2021.exists(), reason="shared benchmarks not present")
@pytest.mark.parametrize("net_name,expected", [("test_sat", Status.FALSIFIED),
                                               ("test_unsat", Status.UNKNOWN)])
def test_vnncomp_2021_test_property(net_name, expected):
    path = TEST_2021 / f"onnx/{net_name}.onnx"
    lo, hi = _read_box(TEST_2021 / "vnnlib/test_prop.vnnlib")
    net = load_network(path)
    prop = _prop_3()
    (cert,) = AttackBackend().certify(net, _box_problem(lo, hi, prop, net.input_shape))
    assert cert.status == expected
    if expected != Status.FALSIFIED:
        return
    cex = np.array(cert.counterexample)
    assert np.all(cex >= lo) and np.all(cex <= hi)  # exactly inside, no tolerance needed
    assert np.array_equal(cex, cex.astype(np.float32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: cex.astype(np.float32).reshape(1, 1, 1, 5)}
    y = session.run(None, feed)
    assert prop.violated(y[0].reshape(-1))
    assert cert.details["distance"] == pytest.approx(np.max(np.abs(cex - (lo + hi) / 2)))


def _linear_net(seed=0, n=6, k=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, k)).eval()
    w = model[0].weight.detach().double().numpy()
    b = model[0].bias.detach().double().numpy()
    return load_network(model), w, b


@pytest.mark.parametrize("norm", [Norm.LINF, Norm.L2])
@pytest.mark.parametrize("gap", [-0.02, 0.02])
def test_linear_network_exact_worst_case(norm, gap):
    """For f(x) = Wx + b the smallest margin of f_0 - f_1 over the ball is known in closed
    form; the attack falsifies exactly when it is negative."""
    net, w, b = _linear_net()
    x0 = np.random.default_rng(1).standard_normal(6)
    c = np.zeros(3)
    c[0], c[1] = 1, -1
    centre_margin = c @ (w @ x0 + b)
    if centre_margin < 0:
        c = -c
        centre_margin = -centre_margin
    g = w.T @ c
    dual = np.abs(g).sum() if norm == Norm.LINF else np.linalg.norm(g)
    eps = centre_margin / dual * (1 - gap)  # worst margin = centre_margin * gap
    prop = Property.linear([(c[None], np.zeros(1))], 3)
    problem = Problem(x0[None], (prop,), Perturbation.ball(norm, eps))
    (cert,) = AttackBackend().certify(net, problem)
    if gap > 0:
        assert cert.status == Status.UNKNOWN and cert.details["best_margin"] > 0
        return
    assert cert.status == Status.FALSIFIED
    cex = np.array(cert.counterexample)
    ord_ = np.inf if norm == Norm.LINF else 2
    assert np.linalg.norm(cex - x0, ord_) <= eps
    assert cert.details["distance"] == pytest.approx(np.linalg.norm(cex - x0, ord_))
    assert c @ (w @ cex + b) <= 0


def test_general_property_against_linear_programming():
    """A disjunction of two conjunctions on a linear network over a box: the LP optimum says a
    violation exists only in the second term; the attack finds it."""
    net, w, b = _linear_net(seed=3, n=4, k=3)
    lo, hi = -np.ones(4), np.ones(4)
    c1 = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    c2 = np.array([[0, 0, 1.0], [1.0, -1.0, 0]])

    def lp_min(c, d):  # min over the box of max_r (c_r (Wx + b) - d_r), as an LP in (x, s)
        a = np.hstack([c @ w, -np.ones((len(c), 1))])
        res = linprog(np.r_[np.zeros(4), 1.0], A_ub=a, b_ub=d - c @ b,
                      bounds=[(-1, 1)] * 4 + [(None, None)])
        assert res.status == 0
        return res.fun

    d1 = np.array([lp_min(c1, np.zeros(2)) - 0.5] * 2)  # term 1: never violated
    d2 = np.zeros(2)
    d2 += lp_min(c2, d2) + 0.05  # term 2: violated with slack 0.05 at the LP optimum
    assert lp_min(c1, d1) > 0 and lp_min(c2, d2) < 0
    prop = Property.linear([(c1, d1), (c2, d2)], 3)
    assert not prop.violated(w @ np.zeros(4) + b)
    problem = _box_problem(lo, hi, prop, (4,))
    (cert,) = AttackBackend(AttackOptions(steps=100)).certify(net, problem)
    assert cert.status == Status.FALSIFIED
    cex = np.array(cert.counterexample)
    assert np.all(np.abs(cex) <= 1) and prop.violated(w @ cex + b)


def test_misclassified_centre_is_falsified_at_zero_radius():
    net = load_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    _, _, x, y = digits_split()
    wrong = np.flatnonzero(net.forward(x).argmax(1) != y)
    right = np.flatnonzero(net.forward(x).argmax(1) == y)
    index = np.r_[wrong[:2], right[:2]]
    problem = Problem.robustness(x[index], y[index], 10, Perturbation.ball("2", 0.0))
    certs = AttackBackend().certify(net, problem)
    assert [c.status for c in certs] == [Status.FALSIFIED] * len(wrong[:2]) + [Status.UNKNOWN] * 2
    for c, i in zip(certs[:len(wrong[:2])], wrong[:2], strict=True):
        assert np.array_equal(np.array(c.counterexample), x[i].reshape(-1).astype(np.float64))
        assert c.details["distance"] == 0


class Cancelling(nn.Module):
    """y = (x + 1e8) - 1e8: 0 in float32 for |x| < 4, x in float64."""

    def forward(self, x):
        return (x + 1e8) - 1e8


def test_float32_only_violation_is_not_reported():
    net = load_network(Cancelling(), (1,))
    prop = Property.linear([(np.ones((1, 1)), np.array([0.5]))], 1)  # violated when y <= 0.5
    problem = Problem(np.ones((1, 1)), (prop,), Perturbation.ball("inf", 0.25))
    (cert,) = AttackBackend().certify(net, problem)
    assert net.forward(np.ones((1, 1)))[0, 0] == 0.0  # float32 claims a violation
    assert cert.status == Status.UNKNOWN and cert.counterexample is None
    assert cert.details["margin_float32"] <= 0 < cert.details["margin_float64"]


@pytest.mark.parametrize("norm,eps", [("inf", 0.1), ("2", 0.7)])
def test_digits_counterexamples_are_real_and_deterministic(norm, eps):
    model = load_shipped("digits_cnn").double()
    net = load_network(load_shipped("digits_cnn"), INPUT_SHAPE)
    _, _, x, y = digits_split()
    problem = Problem.robustness(x[:24], y[:24], 10, Perturbation.ball(norm, eps))
    certs = AttackBackend(AttackOptions(steps=30, batch_size=7)).certify(net, problem)
    falsified = [i for i, c in enumerate(certs) if c.status == Status.FALSIFIED]
    assert len(falsified) >= 3
    ord_ = np.inf if norm == "inf" else 2
    for i in falsified:
        cex = np.array(certs[i].counterexample)
        assert np.linalg.norm(cex - x[i].reshape(-1), ord_) <= eps
        with torch.no_grad():
            out = model(torch.from_numpy(cex).reshape(1, *INPUT_SHAPE))[0].numpy()
        assert out.argmax() != y[i] or out[y[i]] <= np.delete(out, y[i]).max()
    again = AttackBackend(AttackOptions(steps=30, batch_size=24)).certify(net, problem)
    assert [c.status for c in again] == [c.status for c in certs]
    repeat = AttackBackend(AttackOptions(steps=30, batch_size=7)).certify(net, problem)
    assert [c.counterexample for c in repeat] == [c.counterexample for c in certs]


def test_deadline_and_supports():
    net = load_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    _, _, x, y = digits_split()
    problem = Problem.robustness(x[:3], y[:3], 10, Perturbation.ball("2", 0.5))
    late = problem.with_deadline(time.monotonic() - 1)
    assert {c.status for c in AttackBackend().certify(net, late)} == {Status.TIMEOUT}
    assert AttackBackend().supports(net, problem) is None
    other = Problem.robustness(x[:3], y[:3] % 5, 5, Perturbation.ball("2", 0.5))
    assert "outputs" in AttackBackend().supports(net, other)


MNIST_FC = Path("/work/shared/benchmarks/vnncomp/mnist_fc_2022")


def _read_robustness(path):
    """A VNN-COMP mnist_fc property read by hand: the input box and the label whose
    robustness it states (violated when some Y_j >= Y_label)."""
    text = path.read_text()
    lo, hi = _read_box(path)
    label = int(re.search(r"label: (\d+)", text).group(1))
    others = sorted(int(j) for j, t in re.findall(r"\(>= Y_(\d+) Y_(\d+)\)", text))
    assert others == [j for j in range(10) if j != label]
    return lo, hi, Property.robust(label, 10)


@pytest.mark.skipif(not MNIST_FC.exists(), reason="shared benchmarks not present")
@pytest.mark.parametrize("prop_name,expected", [
    ("prop_2_0.03", Status.FALSIFIED),  # a plateau around the centre: needs diversified starts
    ("prop_0_0.05", Status.FALSIFIED),
    ("prop_0_0.03", Status.UNKNOWN),    # verified by the competition: never falsified
    ("prop_3_0.05", Status.UNKNOWN)])
def test_vnncomp_2022_mnist_fc(prop_name, expected):
    path = MNIST_FC / "onnx/mnist-net_256x2.onnx"
    lo, hi, prop = _read_robustness(MNIST_FC / f"vnnlib/{prop_name}.vnnlib")
    net = load_network(path)
    (cert,) = AttackBackend().certify(net, _box_problem(lo, hi, prop, net.input_shape))
    assert cert.status == expected
    if expected == Status.FALSIFIED:
        cex = np.array(cert.counterexample, np.float32)
        assert np.all(cex >= lo) and np.all(cex <= hi)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        y = session.run(None, {session.get_inputs()[0].name: cex.reshape(1, 784, 1)})[0]
        assert prop.violated(y.reshape(-1))
