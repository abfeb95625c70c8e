"""`lipverify.bab.search`: with clamped or blended split relaxations, an input is verified
exactly when an exact MILP says it is robust (complete and sound on small nets)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lipverify.bab.problem import chain_of, input_set, terms_of
from lipverify.bab.search import Search, SearchOptions
from lipverify.backends._margin_search import CentreFacts
from lipverify.network.load import load_network
from lipverify.testing import one_torch_thread
from lipverify.types import Perturbation, Problem, Status

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from test_bab import _mlp, _robust_by_milp  # noqa: E402


@pytest.mark.parametrize(("blend", "refine", "trust_fast"),
                         [(False, True, True), (False, True, False), (False, False, None),
                          (True, True, None)])
def test_verified_exactly_when_the_milp_says_robust(blend, refine, trust_fast):
    """Clamped or blended splits, with or without each domain's own bounds, proven by their
    float32 allowance or recomputed in float64: every answer is the MILP's."""
    module, stages = _mlp(5)
    net = load_network(module, (4,))
    x = np.random.default_rng(5).uniform(-1, 1, (8, 4)).astype(np.float32)
    labels = net.forward(x).argmax(1)
    eps = 0.6
    problem = Problem.robustness(x, labels, 3, Perturbation.ball("inf", eps))
    facts = CentreFacts.of(net, problem)
    chain = chain_of(net)
    got, domains = [], []
    with one_torch_thread():
        for i in range(len(x)):
            region, spec = facts.region.subset(np.array([i])), facts.spec.subset(np.array([i]))
            search = Search(chain, input_set(region, torch.device("cpu")),
                            terms_of(spec, torch.device("cpu")), 0.0,
                            SearchOptions(batch=8, blend=blend, refine=refine,
                                          trust_fast=trust_fast))
            out = search.run()
            got.append(out.status == Status.VERIFIED)
            domains.append(out.domains)
    truth = [_robust_by_milp(module, stages, x[k].astype(np.float64), int(labels[k]), eps)
             for k in range(len(x))]
    assert got == truth
    assert any(truth) and not all(truth)
    assert max(d for d, ok in zip(domains, got, strict=True) if ok) > 2  # some needed splits
