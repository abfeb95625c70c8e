"""`lipverify lipschitz --lower / --claim / --parameters` on ONNX models with known constants."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.cli.main import main
from lipverify.network.modules import ResidualBlock


def _export(model, n, path):
    torch.onnx.export(model.eval(), torch.zeros(1, n), str(path), dynamo=False)
    return str(path)


@pytest.fixture
def linear_residual(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ResidualBlock(nn.Linear(3, 3)))
    with torch.no_grad():
        w = model[0].body[0].weight
        w.mul_(0.6 / np.linalg.norm(w.numpy(), 2))
    a = model[0].body[0].weight.detach().double().numpy()
    sigma = np.linalg.svd(np.eye(3) + a, compute_uv=False).min()
    return _export(model, 3, tmp_path / "res.onnx"), a, sigma


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_lower_with_a_false_claim_prints_the_pair(capsys, linear_residual):
    path, a, sigma = linear_residual
    out = _json(capsys, ["lipschitz", path, "--claim", str(1.05 * sigma), "--json"])
    certified, search = out["certified"]["value"], out["search"]
    assert sigma * (1 - 1e-6) <= certified <= sigma  # float32 weights: sigma of those exactly
    # proven: certified <= true constant <= exact ratio of the pair <= ratio_upper
    assert certified <= search["ratio_upper"] and search["violates"]
    assert certified <= search["ratio"] * (1 + 1e-9)  # float64 ratio: rounding of a close pair
    x, xp = np.array(search["x"]), np.array(search["x_prime"])
    ratio = np.linalg.norm((np.eye(3) + a) @ (x - xp)) / np.linalg.norm(x - xp)
    assert ratio < 1.05 * sigma and ratio == pytest.approx(search["ratio"], rel=1e-9)
    assert main(["lipschitz", path, "--lower", "--claim", str(1.05 * sigma)]) == 0
    text = capsys.readouterr().out
    assert "certified lower bound" in text and "is FALSE" in text and "x' = [" in text


def test_lower_true_claim_and_plain_output_unchanged(capsys, linear_residual):
    path, _, sigma = linear_residual
    out = _json(capsys, ["lipschitz", path, "--claim", str(0.9 * sigma), "--json"])
    assert not out["search"]["violates"]
    assert main(["lipschitz", path]) == 0
    plain = capsys.readouterr().out
    assert plain.splitlines()[0].split()[:3] == ["backend", "upper", "bound"]
    assert "lower Lipschitz" not in plain


def test_parameters_mode_on_one_linear_layer(capsys, tmp_path):
    torch.manual_seed(1)
    path = _export(nn.Sequential(nn.Linear(4, 2)), 4, tmp_path / "lin.onnx")
    out = _json(capsys, ["lipschitz", path, "--parameters", "--input-radius", "2",
                         "--param-radius", "0.1", "--json"])
    exact = np.sqrt(2.0 ** 2 + 1)  # sqrt(R^2 + 1) for an affine layer
    assert exact <= out["bound"]["value"] <= exact * (1 + 1e-12)
    assert out["sampled"]["value"] <= exact and out["ratio"] >= 1
    assert main(["lipschitz", path, "--parameters", "--input-radius", "2",
                 "--param-radius", "0.1"]) == 0
    assert "sampled lower bound" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--parameters", "--input-radius", "1"], "--param-radius"),
    (["--lower", "--norm", "inf"], "L2 only"),
    (["--lower", "--parameters"], "separate modes"),
    (["--parameters", "--input-radius", "1", "--param-radius", "0"], "parameter radius"),
])
def test_mode_errors_are_one_line(capsys, linear_residual, extra, needle):
    code = main(["lipschitz", linear_residual[0], *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and needle in err, err
