"""VNN-LIB parsing: the competition's files against their recorded facts, hand-made specs,
line-numbered errors, and random formulas against a direct evaluation of their meaning."""

from __future__ import annotations

import csv
import functools
import gzip
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipverify.errors import InputError
from lipverify.vnncomp.results import parse_counterexample
from lipverify.vnncomp.vnnlib import VnnlibError, parse_vnnlib_text, read_vnnlib

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "vnncomp"
needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason="shared benchmarks not present")

HEAD = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n" \
       "(declare-const Y_1 Real)\n"
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 2))\n"


@functools.cache
def _spec(path: Path):
    return read_vnnlib(path)


def _checks(bench: str) -> list[dict]:
    with (BENCH / bench / "checks.csv").open() as fh:
        return list(csv.DictReader(fh))


@needs_bench
@pytest.mark.parametrize("bench", ["test_2021", "mnist_fc_2022"])
def test_competition_files_match_recorded_facts(bench):
    for row in _checks(bench):
        spec = _spec(BENCH / bench / row["vnnlib"])
        assert (spec.num_inputs, spec.num_outputs) == (int(row["n_inputs"]),
                                                        int(row["n_outputs"]))
        assert len(spec.cases) == 1
        case = spec.cases[0]
        width = case.upper - case.lower
        assert width.min() == pytest.approx(float(row["box_width_min"]), rel=1e-5, abs=1e-6)
        assert width.max() == pytest.approx(float(row["box_width_max"]), rel=1e-5, abs=1e-6)
        assert len(case.prop.terms) == int(row["n_disjuncts"])


@needs_bench
def test_shipped_counterexamples_violate_the_parsed_property():
    checked = 0
    for bench in ("test_2021", "mnist_fc_2022", "oval21_2022"):
        for row in _checks(bench):
            if not row["stored_counterexample"]:
                continue
            x, y = parse_counterexample((BENCH / bench / row["stored_counterexample"])
                                        .read_text())
            case = _spec(BENCH / bench / row["vnnlib"]).cases[0]
            assert np.all(x >= case.lower - 1e-4) and np.all(x <= case.upper + 1e-4)
            assert case.prop.violated(y)
            assert case.prop.margin(y) == pytest.approx(float(row["ce_min_slack"]), abs=1e-4)
            checked += 1
    assert checked == 20  # 18 mnist_fc + 1 oval21 + 1 test_2021 sat instances


def test_box_and_output_comparisons_between_outputs():
    spec = parse_vnnlib_text(HEAD + BOX + "(assert (<= Y_0 Y_1))\n")
    (case,) = spec.cases
    np.testing.assert_array_equal(case.lower, [0, -1])
    np.testing.assert_array_equal(case.upper, [1, 2])
    (c, d), = case.prop.terms
    np.testing.assert_array_equal(c, [[1, -1]])
    np.testing.assert_array_equal(d, [0])
    assert case.prop.violated(np.array([0.0, 1.0]))
    assert not case.prop.violated(np.array([2.0, 1.0]))


def test_arithmetic_constants_and_scaling():
    spec = parse_vnnlib_text(HEAD + BOX + "(assert (>= (+ Y_0 (* 2 Y_1) (- 3)) (/ 1 2)))\n"
                                         "(assert (= Y_1 (- 1.5e0)))\n")
    (case,) = spec.cases
    (c, d), = case.prop.terms
    # -(y0 + 2 y1 - 3) + 0.5 <= 0, y1 + 1.5 <= 0, -(y1 + 1.5) <= 0
    np.testing.assert_allclose(c, [[-1, -2], [0, 1], [0, -1]])
    np.testing.assert_allclose(d, [-3.5, -1.5, 1.5])


def test_input_disjunction_gives_one_case_per_box():
    text = HEAD + ("(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 0))"
                   "            (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_1 0))"
                   "            (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1) (<= Y_0 5))))")
    spec = parse_vnnlib_text(text)
    assert len(spec.cases) == 2
    first, second = spec.cases
    np.testing.assert_array_equal(first.upper, [1, 1])
    assert len(first.prop.terms) == 2
    np.testing.assert_array_equal(second.lower, [2, 0])
    assert len(second.prop.terms) == 1


def test_inputs_inside_the_disjunction_as_in_test_small():
    text = ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
            "(assert (or\n    (and (>= X_0 -1) (<= X_0 1) (>= Y_0 100))\n))")
    (case,) = parse_vnnlib_text(text).cases
    assert (case.lower[0], case.upper[0]) == (-1, 1)
    assert case.prop.violated(np.array([100.0])) and not case.prop.violated(np.array([99.0]))


def test_conjunction_of_two_disjunctions_is_their_product():
    text = HEAD + BOX + "(assert (or (<= Y_0 0) (<= Y_1 0)))\n(assert (or (<= Y_0 5) " \
                        "(>= Y_1 7)))\n"
    (case,) = parse_vnnlib_text(text).cases
    assert len(case.prop.terms) == 4
    assert case.prop.violated(np.array([0.0, 8.0]))
    assert not case.prop.violated(np.array([6.0, 0.0]))  # second assert fails


def test_contradictions_drop_disjuncts():
    text = HEAD + "(assert (or (and (>= X_0 1) (<= X_0 0) (>= X_1 0) (<= X_1 1))" \
                  "            (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= 1 0))))" \
                  "(assert (<= Y_0 0))"
    assert parse_vnnlib_text(text).cases == ()


def test_no_output_condition_means_every_output_violates():
    (case,) = parse_vnnlib_text(HEAD + BOX).cases
    assert case.prop.violated(np.array([1e9, -1e9]))


def test_gzip_files(tmp_path):
    path = tmp_path / "p.vnnlib.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(HEAD + BOX + "(assert (<= Y_0 Y_1))\n")
    assert read_vnnlib(path).num_inputs == 2


@pytest.mark.parametrize(("text", "line", "words"), [
    (HEAD + BOX + "(assert (<= Y_0 0)\n", 9, "never closed"),
    (HEAD + BOX + "(assert (<= Y_0 0)))\n", 9, "unbalanced"),
    (HEAD + BOX + "(assert (<= Y_2 0))\n", 9, "undeclared variable 'Y_2'"),
    (HEAD + BOX + "\n(assert (<= X_0 Y_0))\n", 10, "mixes inputs and outputs"),
    (HEAD + BOX + "(assert (<= (+ X_0 X_1) 1))\n", 9, "not a box"),
    (HEAD + BOX + "(assert (<= (* Y_0 Y_1) 1))\n", 9, "not linear"),
    (HEAD + BOX + "(assert (not (<= Y_0 1)))\n", 9, "unsupported connective"),
    (HEAD + "(declare-const X_0 Real)\n", 5, "declared twice"),
    ("(declare-const Z Real)\n", 1, "not named"),
    ("(declare-const X_0 Int)\n", 1, "only Real"),
    (HEAD + BOX + "(assert (<= Y_0 inf))\n", 9, "undeclared variable 'inf'"),
    (HEAD + BOX + "(define-fun f () Real 1)\n", 9, "unsupported command"),
])
def test_errors_name_the_line(text, line, words):
    with pytest.raises(VnnlibError) as info:
        parse_vnnlib_text(text, "spec.vnnlib")
    assert info.value.line == line
    assert str(info.value).startswith(f"spec.vnnlib:{line}: ")
    assert words in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize(("text", "words"), [
    (HEAD + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (<= X_1 1))\n", "X_1 has no lower"),
    ("(declare-const X_1 Real)\n(declare-const Y_0 Real)\n", "X_0 is not declared"),
    ("(declare-const X_0 Real)\n", "no Y_i variable"),
])
def test_semantic_errors(text, words):
    with pytest.raises(VnnlibError, match=words):
        parse_vnnlib_text(text)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_vnnlib(tmp_path / "nope.vnnlib")


# Random formulas: the parsed cases must accept exactly the (x, y) points the formula accepts.
_VARS = ["X_0", "X_1", "Y_0", "Y_1"]


def _atoms() -> st.SearchStrategy:
    const = st.integers(-3, 3).map(str)
    out = st.sampled_from(["Y_0", "Y_1"])
    inp = st.sampled_from(["X_0", "X_1"])
    op = st.sampled_from(["<=", ">="])
    return st.one_of(
        st.tuples(op, out, st.one_of(out, const)),
        st.tuples(op, inp, const),
        st.tuples(op, st.tuples(st.just("+"), out, out), const),
    )


def _formulas() -> st.SearchStrategy:
    return st.recursive(_atoms(), lambda inner: st.tuples(
        st.sampled_from(["and", "or"]), st.lists(inner, min_size=1, max_size=3)), max_leaves=8)


def _text(node: object) -> str:
    if isinstance(node, str):
        return node
    if node[0] in ("and", "or"):
        return f"({node[0]} {' '.join(_text(n) for n in node[1])})"
    return "(" + " ".join(_text(n) for n in node) + ")"


def _value(node: object, env: dict[str, float]) -> float:
    if isinstance(node, str):
        return env[node] if node in env else float(node)
    return sum(_value(n, env) for n in node[1:])  # "+"


def _holds(node: object, env: dict[str, float]) -> bool:
    head = node[0]
    if head == "and":
        return all(_holds(n, env) for n in node[1])
    if head == "or":
        return any(_holds(n, env) for n in node[1])
    lhs, rhs = _value(node[1], env), _value(node[2], env)
    return lhs <= rhs if head == "<=" else lhs >= rhs


@settings(max_examples=80, deadline=None)
@given(st.lists(_formulas(), min_size=1, max_size=3),
       st.lists(st.tuples(*[st.integers(-4, 4)] * 4), min_size=20, max_size=20))
def test_random_formulas_match_their_meaning(formulas, points):
    bounds = "(assert (>= X_0 -4))\n(assert (<= X_0 4))\n(assert (>= X_1 -4))\n" \
             "(assert (<= X_1 4))\n"
    text = HEAD + bounds + "".join(f"(assert {_text(f)})\n" for f in formulas)
    spec = parse_vnnlib_text(text)
    for point in points:
        env = dict(zip(_VARS, map(float, point), strict=True))
        expected = all(_holds(f, env) for f in formulas)
        x, y = np.array(point[:2], float), np.array(point[2:], float)
        got = any(np.all(x >= c.lower) and np.all(x <= c.upper) and c.prop.violated(y)
                  for c in spec.cases)
        assert got == expected, (text, point)


def _bounds(text: str, scale: int = 1) -> tuple[float, float]:
    """The parsed box of `X_0` bounded by `text` (divided by `scale`) on both sides."""
    lhs = "X_0" if scale == 1 else f"(* {scale} X_0)"
    spec = parse_vnnlib_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
                             f"(assert (>= {lhs} {text}))\n(assert (<= {lhs} {text}))\n"
                             "(assert (<= Y_0 0))\n")
    (case,) = spec.cases
    return float(case.lower[0]), float(case.upper[0])


def _tight_enclosure(lower: float, upper: float, exact: Fraction) -> None:
    """`lower` is the largest float64 <= exact, `upper` the smallest >= exact."""
    assert Fraction(lower) <= exact <= Fraction(upper)
    assert Fraction(math.nextafter(lower, math.inf)) > exact
    assert Fraction(math.nextafter(upper, -math.inf)) < exact


@pytest.mark.parametrize("text", ["0.1", "0.3", "-0.30353115613746867", "1e-45", "0.5", "3",
                                  "0.0039215686274509803", "-2.5E+3"])
def test_input_bounds_enclose_the_decimal(text):
    lower, upper = _bounds(text)
    _tight_enclosure(lower, upper, Fraction(text))
    assert (lower == upper) == (Fraction(lower) == Fraction(text))  # equal only when exact


@settings(max_examples=200, deadline=None)
@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6,
                   places=20), st.sampled_from([1, 3, -7]))
def test_random_decimal_bounds_are_enclosed(value, scale):
    text = format(value, "f")
    lower, upper = _bounds(text, scale)
    exact = Fraction(text) / scale  # a negative scale swaps which atom bounds which side
    _tight_enclosure(lower, upper, exact)


def test_box_rounded_out_to_float32_keeps_the_decimal_box():
    text = HEAD + ("(assert (>= X_0 0.1))\n(assert (<= X_0 0.1))\n"
                   "(assert (>= X_1 -0.5))\n(assert (<= X_1 0.3))\n(assert (<= Y_0 Y_1))\n")
    (case,) = parse_vnnlib_text(text).cases
    box = case.rounded_out(np.float32)
    assert box.prop is case.prop
    for lo, hi, text_lo, text_hi in zip(box.lower, box.upper, ("0.1", "-0.5"), ("0.1", "0.3"),
                                        strict=True):
        assert np.float32(lo) == lo and np.float32(hi) == hi  # float32 values
        assert Fraction(lo) <= Fraction(text_lo) and Fraction(hi) >= Fraction(text_hi)
    # 0.1 has no float32 value: the box spans its two float32 neighbours.
    # (float() first: NumPy would compare a float32 with 0.1 rounded to float32)
    assert box.lower[0] == float(np.nextafter(np.float32(0.1), np.float32(0))) < 0.1
    assert box.upper[0] == float(np.float32(0.1)) > 0.1
    assert box.lower[1] == -0.5 and box.upper[1] == float(np.float32(0.3))  # exact / above
    lo64, hi64 = box.rounded_out(np.float64).lower, box.rounded_out(np.float64).upper
    np.testing.assert_array_equal(lo64, box.lower)  # float32 values stay put
    np.testing.assert_array_equal(hi64, box.upper)
