"""Memory budgets: LipSDP refuses (with its estimate) under a small budget and solves under a
generous one; lirpa splits a batch that does not fit and its bounds do not change.

Complements `tests/sdp/test_bound.py::test_memory_budget_refuses_with_the_estimate` (the SDP
layer's `ResourceError`), `tests/backends/test_lipsdp.py::test_supports_*` ("GiB" in the reason)
and `tests/backends/test_lirpa.py::test_memory_budget_splits_batches_without_changing_bounds`
(adapter level, 2e-5): here the backends, the cascade and the CLI, with the real solvers.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import lipverify.sdp.bound as sdp_bound
from lipverify.backends.lipsdp import LipSDPBackend, LipSDPOptions
from lipverify.backends.lirpa import AlphaCrownBackend, LirpaBackend, LirpaOptions, Method
from lipverify.backends.spectral import SpectralBackend
from lipverify.cli.main import main
from lipverify.data import load_data
from lipverify.errors import ResourceError
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.load import build_network
from lipverify.network.network import Network
from lipverify.orchestrator import run_cascade
from lipverify.sdp import chain_from_layers, estimate
from lipverify.sdp.chain import power_of_two_scales, reduce_input
from lipverify.testing import jacobian_lower_bound, make_network
from lipverify.types import Norm, Perturbation, Problem, Status

SMALL_GB = 0.1      # below the solver's fixed overhead: every LipSDP is refused
GENEROUS_GB = 1.0
N_INPUTS = 10
CHUNK = 3           # inputs per auto_LiRPA call under the small lirpa budget
# Bounds of an input split from its batch differ only by float32 rounding (other BLAS shapes);
# alpha-CROWN's Adam steps compound that rounding a little (2e-6 measured after 5 steps).
SPLIT_REL_TOL = {Method.CROWN: 1e-6, Method.ALPHA_CROWN: 1e-5}


@pytest.fixture(scope="module")
def mlp() -> Network:
    """A random 8-32-32-3 ReLU MLP (LipSDP matrix 72x72: three pair SDPs, well under 1 s)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                               nn.Linear(32, 3))
    return make_network(module, (8,), "mlp")


@pytest.fixture(scope="module")
def mlp_problem(mlp: Network) -> Problem:
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    return Problem.robustness(x, mlp.forward(x).argmax(1), 3, Perturbation.ball(Norm.L2, 0.05))


@pytest.fixture()
def solves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts LipSDP solver runs: wraps (not replaces) the real `solve_chain`."""
    calls: list[int] = []
    real = sdp_bound.solve_chain

    def spy(chain, *args, **kwargs):  # noqa: ANN001, ANN202 - pass-through
        calls.append(chain.input_size + sum(chain.hidden_sizes))
        return real(chain, *args, **kwargs)

    monkeypatch.setattr(sdp_bound, "solve_chain", spy)
    return calls


def _estimate_gb(network: Network) -> float:
    scaled, _ = power_of_two_scales(chain_from_layers(network.require_layers()))
    return estimate(scaled, reduce_input(scaled), LipSDPOptions().sdp_options().solver).total_gb


def test_lipsdp_small_budget_refuses_with_the_estimate(mlp, mlp_problem, solves, tmp_path):
    """supports() declines, certify() answers `error` and lipschitz() raises, each naming the
    estimate and the budget, and no solver runs."""
    need = _estimate_gb(mlp)
    assert SMALL_GB < need < GENEROUS_GB
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path), memory_budget_gb=SMALL_GB))
    why = backend.supports(mlp, mlp_problem)
    assert why is not None and f"about {need:.2f} GiB" in why and f"budget {SMALL_GB:.2f}" in why
    certs = backend.certify(mlp, mlp_problem)
    assert [c.status for c in certs] == [Status.ERROR] * len(mlp_problem)
    for cert in certs:
        assert f"about {need:.2f} GiB" in cert.details["error"]
        assert f"budget is {SMALL_GB:.2f} GiB" in cert.details["error"]
    with pytest.raises(ResourceError, match=re.escape(f"about {need:.2f} GiB")):
        backend.lipschitz(mlp, Norm.L2)
    assert solves == []


def test_lipsdp_generous_budget_solves_the_same_net(mlp, mlp_problem, solves, tmp_path):
    # prune=False: every pair the labels need is solved, none skipped as hopeless.
    backend = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path), memory_budget_gb=GENEROUS_GB,
                                          prune=False))
    assert backend.supports(mlp, mlp_problem) is None
    certs = backend.certify(mlp, mlp_problem)
    assert len(solves) == 3  # one SDP per class pair, really solved
    assert all(c.status in (Status.VERIFIED, Status.UNKNOWN) for c in certs)
    assert any(c.status == Status.VERIFIED for c in certs)
    bound = backend.lipschitz(mlp, Norm.L2)
    sampled = jacobian_lower_bound(mlp.module, mlp.input_shape, Norm.L2, samples=200)
    assert math.isfinite(bound.value) and bound.value >= sampled


def test_cascade_skips_an_over_budget_lipsdp_and_says_why(mlp, mlp_problem, tmp_path):
    small = LipSDPBackend(LipSDPOptions(cache_dir=str(tmp_path), memory_budget_gb=SMALL_GB))
    outcome = run_cascade(mlp, mlp_problem, [SpectralBackend(), small])
    assert "GiB" in outcome.skipped["lipsdp"] and "budget" in outcome.skipped["lipsdp"]
    assert all(c.backend == "spectral" for c in outcome.best)


def test_cli_records_the_memory_refusal(tmp_path, capsys, monkeypatch):
    """`certify --set backends.lipsdp.memory_budget_gb=0.1`: lipsdp skipped with the estimate in
    every record, the run itself succeeds."""
    monkeypatch.setenv("LIPVERIFY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "r.jsonl"
    code = main(["certify", "--backends", "spectral,lipsdp", "--limit", "3", "--eps", "0.1",
                 "--mode", "radius",
                 "--set", f"backends.lipsdp.memory_budget_gb={SMALL_GB}", "--out", str(out),
                 "--no-progress", "--json"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert re.search(r"LipSDP needs about [0-9.]+ GiB .*budget 0\.10 GiB",
                         record["skipped"]["lipsdp"])
    capsys.readouterr()


# -- lirpa: memory-aware batching ----------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_data("digits", limit=N_INPUTS)


@pytest.fixture(scope="module")
def networks() -> dict[str, Network]:
    return {name: build_network(load_shipped(name), INPUT_SHAPE)
            for name in ("digits_mlp", "digits_cnn")}


def _budget_for(backend_cls: type, network: Network, method: Method, inputs: int) -> float:
    """A budget (GiB) that fits `inputs` inputs per auto_LiRPA call, from the adapter's own
    per-input estimate (the chunk that 1 GiB allows)."""
    probe = backend_cls(LirpaOptions(batch_size=10**9, memory_budget_gb=1.0))
    per_gib = probe.adapter(network).chunk_size(method)
    return (inputs + 0.5) / per_gib


def _spy_batches(backend: LirpaBackend, network: Network,
                 monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the batches the adapter hands auto_LiRPA (wraps the real call).

    alpha-CROWN's float64 pass with the slopes found in float32 (`reuse_alpha`) goes with the
    CROWN pass on the same batch: one batch, counted once.
    """
    adapter = backend.adapter(network)
    sizes: list[int] = []
    real = adapter._bounds

    def spy(x, method, **kwargs):  # noqa: ANN001, ANN202 - pass-through
        if not kwargs.get("reuse_alpha"):
            sizes.append(int(x.shape[0]))
        return real(x, method, **kwargs)

    monkeypatch.setattr(adapter, "_bounds", spy)
    return sizes


@pytest.mark.parametrize(("backend_cls", "net", "norm", "eps"), [
    (LirpaBackend, "digits_mlp", Norm.L2, 0.3),
    (LirpaBackend, "digits_cnn", Norm.LINF, 0.02),
    (AlphaCrownBackend, "digits_mlp", Norm.L2, 0.3),
], ids=["crown-mlp-l2", "crown-cnn-linf", "alpha-mlp-l2"])
def test_lirpa_small_budget_splits_the_batch_same_bounds(backend_cls, net, norm, eps, networks,
                                                         digits, monkeypatch):
    network = networks[net]
    x, y = digits
    problem = Problem.robustness(x, y, 10, Perturbation.ball(norm, eps))
    method = backend_cls.default_method
    extra = {"alpha_iterations": 5} if method == Method.ALPHA_CROWN else {}
    whole = backend_cls(LirpaOptions(**extra))
    whole_sizes = _spy_batches(whole, network, monkeypatch)
    reference = whole.certify(network, problem)
    assert whole_sizes == [N_INPUTS]

    budget = _budget_for(backend_cls, network, method, CHUNK)
    split = backend_cls(LirpaOptions(memory_budget_gb=budget, **extra))
    assert split.adapter(network).chunk_size(method) == CHUNK
    sizes = _spy_batches(split, network, monkeypatch)
    certs = split.certify(network, problem)
    assert sizes == [3, 3, 3, 1]

    got = np.array([c.margin_lower for c in certs])
    want = np.array([c.margin_lower for c in reference])
    assert np.all(np.isfinite(want))
    tol = SPLIT_REL_TOL[method]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert [c.status for c in certs] == [c.status for c in reference]
    assert any(c.status == Status.VERIFIED for c in certs)
