"""Branch and bound on VNN-COMP instances: a deep mnist_fc property that no bound-only backend
proves is unsat by `bab` alone, a known sat one is never called unsat, and an instance run gives
`bab` the whole timeout (not `certify`'s share per input) and tightened root bounds unless a
config says otherwise; those prove a hard instance the plain search cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipverify.testing import one_torch_thread
from lipverify.vnncomp.results import VnncompResult
from lipverify.vnncomp.runner import RunOptions, _with_defaults, run_instance

BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "vnncomp"
MNIST = BENCH / "mnist_fc_2022"

needs_bench = pytest.mark.skipif(not MNIST.is_dir(), reason="shared benchmarks not present")


def _run(net: str, prop: str, backends: tuple[str, ...], timeout: float,
         sections: dict | None = None):
    options = RunOptions(timeout=timeout, backends=backends, isolate=False,
                         backend_options=sections or {})
    with one_torch_thread():
        return run_instance(MNIST / "onnx" / f"mnist-net_{net}.onnx",
                            MNIST / "vnnlib" / f"{prop}.vnnlib", options)


@needs_bench
def test_a_deep_unsat_instance_is_proven_by_bab_and_not_by_alpha_crown():
    """Known unsat (nine tools agree); alpha-CROWN alone leaves it open."""
    assert _run("256x6", "prop_12_0.03", ("bab",), 90).result == VnncompResult.UNSAT
    assert _run("256x6", "prop_12_0.03", ("alpha-crown",), 60).result != VnncompResult.UNSAT


@needs_bench
def test_a_known_sat_instance_is_never_unsat():
    answer = _run("256x2", "prop_1_0.03", ("bab",), 8)
    assert answer.result in (VnncompResult.UNKNOWN, VnncompResult.TIMEOUT)


@needs_bench
def test_tightened_root_bounds_prove_what_the_plain_search_cannot():
    """256x4 `prop_11_0.05` (known unsat): the instance default (a plain search, then tightened
    root bounds) proves it within 60 s; the plain search alone does not (nor at 300 s)."""
    assert _run("256x4", "prop_11_0.05", ("bab",), 60).result == VnncompResult.UNSAT
    plain = _run("256x4", "prop_11_0.05", ("bab",), 40, {"bab": {"tighten": 0.0}})
    assert plain.result != VnncompResult.UNSAT


def test_instance_runs_lift_babs_time_per_input_and_tighten_unless_configured():
    assert _with_defaults({})["bab"] == {"time_per_input": None, "tighten": 0.4}
    mine = _with_defaults({"bab": {"time_per_input": 5.0, "tighten": 0.0, "beta_lr": 0.1},
                           "attack": {}})
    assert mine["bab"] == {"time_per_input": 5.0, "tighten": 0.0, "beta_lr": 0.1}
    assert mine["attack"] == {}
