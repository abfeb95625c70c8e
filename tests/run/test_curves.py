"""`lipverify lipschitz --checkpoints DIR`: bound curves over checkpoints of a seeded training run.

Independent evidence: a direct `lipverify.api.lipschitz` call on each checkpoint (the same
number, bit for bit), the exact norm of linear checkpoints (an SVD: their Lipschitz constant),
and the PNG's own signature and size.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from matplotlib import image
from torch import nn

from lipverify.api import lipschitz
from lipverify.cli.main import main
from lipverify.data import digits_split
from lipverify.models import digits_mlp
from lipverify.network.load import load_network
from lipverify.run.curves import (
    COLUMNS,
    checkpoint_step,
    find_checkpoints,
    natural_key,
    read_rows,
)

EPOCHS = (1, 2, 10)  # saved as epoch_<n>.pt: 10 sorts last only when compared as a number
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train(model: nn.Module, folder, epochs, save) -> None:
    torch.manual_seed(0)
    x, y, _, _ = digits_split()
    x, y = torch.as_tensor(x[:400]), torch.as_tensor(y[:400])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(1, max(epochs) + 1):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch in epochs:
            save(model, folder / f"epoch_{epoch}.pt")


def _save_script(model: nn.Module, path) -> None:
    model.zero_grad(set_to_none=True)
    torch.jit.script(model).save(str(path))


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    _train(digits_mlp(), folder, EPOCHS, lambda m, p: torch.save(m.state_dict(), p))
    (folder / "notes.txt").write_text("not a checkpoint")
    return folder


def _csv(path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _cli(capsys, *args: str) -> str:
    assert main(["lipschitz", *args]) == 0
    return capsys.readouterr().out


def test_natural_order_and_steps(mlp_dir):
    names = [p.name for p in find_checkpoints(mlp_dir)]
    assert names == [f"epoch_{e}.pt" for e in EPOCHS]
    assert sorted(["epoch_10.pt", "epoch_9.pt", "b1.pt", "a20.pt"], key=natural_key) == \
        ["a20.pt", "b1.pt", "epoch_9.pt", "epoch_10.pt"]
    assert checkpoint_step(mlp_dir / "run3_epoch_12.pt") == 12
    assert checkpoint_step(mlp_dir / "final.pt") is None


def test_curves_csv_matches_direct_lipschitz_calls_and_plot_is_a_png(mlp_dir, tmp_path, capsys):
    out = tmp_path / "curves.csv"
    text = _cli(capsys, "--checkpoints", str(mlp_dir), "--arch", "digits_mlp", "--backend",
                "spectral", "--data", "digits", "--curves-out", str(out))
    assert "epoch_10.pt" in text
    rows = _csv(out)
    assert tuple(rows[0]) == COLUMNS
    assert [r["checkpoint"] for r in rows] == [f"epoch_{e}.pt" for e in EPOCHS]
    assert [int(r["step"]) for r in rows] == list(EPOCHS)
    _, _, x_test, _ = digits_split()
    for r in rows:
        upper, lower = float(r["upper"]), float(r["lower"])
        assert upper >= lower > 0
        assert float(r["ratio"]) == upper / lower
        net = load_network(mlp_dir / r["checkpoint"], arch="digits_mlp")
        direct = lipschitz(net, ["spectral"], data=x_test[:256])
        assert upper == direct.bounds[0].value
        assert lower == direct.lower_bound
    # training moves the weights: the curve is not flat
    assert len({r["upper"] for r in rows}) == len(EPOCHS)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(png)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_resume_skips_done_checkpoints_and_runs_only_new_ones(mlp_dir, tmp_path, capsys):
    out = tmp_path / "curves.csv"
    args = ("--checkpoints", str(mlp_dir), "--arch", "digits_mlp", "--curves-out", str(out))
    _cli(capsys, *args)
    first = out.read_text()
    printed = _cli(capsys, *args)  # nothing left to do
    assert out.read_text() == first
    assert "epoch_" not in printed.split("\n", 1)[1].rsplit("wrote", 1)[0]
    # a run killed mid-write leaves a broken line; a new checkpoint appears meanwhile
    out.write_text(first + "epoch_20.pt,20,spec")
    torch.save(digits_mlp().state_dict(), mlp_dir / "epoch_20.pt")
    try:
        printed = json.loads(_cli(capsys, *args, "--json"))
    finally:
        (mlp_dir / "epoch_20.pt").unlink()
    text = out.read_text()
    assert text.startswith(first) and text.count("\n") == first.count("\n") + 1
    assert [r["checkpoint"] for r in printed["rows"]][-1] == "epoch_20.pt"
    assert [r.checkpoint for r in read_rows(out)] == [f"epoch_{e}.pt" for e in (*EPOCHS, 20)]


def test_adding_a_backend_runs_only_that_backend(mlp_dir, tmp_path, capsys):
    out = tmp_path / "curves.csv"
    base = ("--checkpoints", str(mlp_dir), "--arch", "digits_mlp", "--curves-out", str(out))
    _cli(capsys, *base, "--backend", "spectral")
    first = _csv(out)
    _cli(capsys, *base, "--backend", "spectral", "--backend", "lipsdp")
    rows = _csv(out)
    assert rows[:len(first)] == first
    added = rows[len(first):]
    assert [r["backend"] for r in added] == ["lipsdp"] * len(EPOCHS)
    for r in added:  # each row is a sound bound above the same checkpoint's lower bound
        assert float(r["upper"]) >= float(r["lower"])


# The lower bound's float64 copy of a TorchScript module reads .grad (a torch UserWarning).
@pytest.mark.filterwarnings("ignore:The .grad attribute:UserWarning")
def test_linear_checkpoints_give_the_exact_norm_from_both_sides(tmp_path, capsys):
    folder = tmp_path / "linear"
    folder.mkdir()
    _train(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), folder, (1, 3),
           _save_script)
    out = folder / "lipschitz_curves.csv"
    _cli(capsys, "--checkpoints", str(folder), "--input-shape", "1,8,8")
    for row in read_rows(out):
        w = torch.jit.load(str(folder / row.checkpoint)).state_dict()["1.weight"].double()
        exact = float(np.linalg.norm(w.numpy(), 2))
        assert row.upper >= exact * (1 - 1e-12)
        assert math.isclose(row.upper, exact, rel_tol=1e-9)
        assert math.isclose(row.lower, exact, rel_tol=1e-6)  # the Jacobian is W everywhere
