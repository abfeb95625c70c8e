"""`lipverify compare` on the shipped default: table, CSV and PNG plots that agree."""

import csv
import re
import struct

import numpy as np
import pytest

from lipverify.cli.main import main

BACKENDS = "spectral,lipsdp,lirpa"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    code = main(["compare", "--limit", "40", "--backends", BACKENDS, "--eps", "0.1", "0.3",
                 "--out", str(out)])
    assert code == 0
    return out


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_three_valid_plots(report):
    pngs = sorted(report.glob("*.png"))
    assert len(pngs) >= 3
    for p in pngs:
        w, h = _png_size(p)
        assert 300 <= w <= 3000 and 200 <= h <= 3000, (p.name, w, h)


def test_table_matches_per_input_records(report):
    rows = list(csv.DictReader((report / "radii.csv").open()))
    assert len(rows) == 40
    table = (report / "summary.md").read_text()
    for name in [*BACKENDS.split(","), "best"]:
        radii = np.array([float(r[name]) for r in rows])
        ok = np.array([r["label"] == r["predicted"] for r in rows])
        line = next(x for x in table.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        accs = [c for c in cells if c.endswith("%")]
        for eps, shown in zip((0.1, 0.3), accs):
            expected = np.mean(ok & (radii >= eps))
            assert float(shown.rstrip("%")) == pytest.approx(100 * expected, abs=0.05), name
        assert float(cells[-2]) == pytest.approx(np.median(radii), rel=1e-3, abs=1e-9)
    best = np.array([float(r["best"]) for r in rows])
    for name in BACKENDS.split(","):
        assert np.all(best >= np.array([float(r[name]) for r in rows]))


def test_bounds_are_above_the_lower_bound(report):
    table = (report / "summary.md").read_text()
    lower = float(re.search(r"Lower bound on the Lipschitz constant: \*\*([0-9.e+-]+)\*\*",
                            table).group(1))
    for name in ("spectral", "lipsdp"):
        line = next(x for x in table.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        bound, ratio = float(cells[1]), float(cells[2])
        assert bound >= lower and ratio >= 1.0


def test_python_api_mirrors_the_command(tmp_path):
    import lipverify
    from lipverify.data import load_data

    x, y = load_data("digits", limit=10)
    result = lipverify.compare("digits_mlp", x, y, [0.1], backends=["spectral"], out=tmp_path)
    assert [b.name for b in result.backends] == ["spectral"]
    assert result.backends[0].global_bound >= result.lower_bound
    assert (tmp_path / "summary.md").exists() and len(list(tmp_path.glob("*.png"))) == 3
