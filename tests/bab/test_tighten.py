"""`lipverify.bab.tighten`: the tightened root bounds contain every sampled pre-activation, are
inside alpha-CROWN's, and make neurons stable that alpha-CROWN leaves unstable; the partial
search it runs reports exactly the terms it could not refute, and `shrink` narrows the deep
layers."""

from __future__ import annotations

import pytest
import torch

from lipverify.bab.optimise import Steps
from lipverify.bab.pool import Terms
from lipverify.bab.root import root_relaxation
from lipverify.bab.search import Search, SearchOptions
from lipverify.bab.tighten import TightenOptions, tighten_root
from lipverify.types import Status
from tests.bab.test_relaxed import _net, _pre_activations, _region, _samples

WIDTHS = (5, 32, 32, 32, 3)


@pytest.mark.parametrize("kind", ["box", "ball"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tightened_bounds_contain_every_sampled_pre_activation(kind, seed):
    module, chain = _net(seed, WIDTHS)
    inputs = _region(kind, seed)
    steps = Steps(iterations=10)
    plain = root_relaxation(chain, inputs, steps).bounds
    out = tighten_root(chain, inputs, steps, SearchOptions(batch=256),
                       TightenOptions(seconds=10.0, least=1), seed=seed)
    pre = _pre_activations(module, _samples(inputs, 20000, seed))[:-1]
    for k, ((lo, up), (lo0, up0)) in enumerate(zip(out.root.bounds, plain, strict=True)):
        assert (pre[k] >= lo).all() and (pre[k] <= up).all(), k
        assert (lo >= lo0 - 1e-9).all() and (up <= up0 + 1e-9).all(), k
    assert sum(out.proven) > 0
    unstable = [int(((lo < 0) & (up > 0)).sum()) for lo, up in out.root.bounds]
    assert sum(unstable) < sum(int(((lo < 0) & (up > 0)).sum()) for lo, up in plain)


def test_partial_search_names_exactly_the_terms_it_cannot_refute():
    module, chain = _net(3, (5, 12, 12, 3))
    inputs = _region("box", 3)
    with torch.no_grad():
        pre = _pre_activations(module, _samples(inputs, 20000, 3))[-1]
    # z_j < top_j (the sampled maximum + 1) can be proven; z_j < bottom_j cannot (a sample
    # beats it): rows -e_j with d = -top_j, then -e_j with d = -bottom_j
    top, bottom = pre.max(dim=0).values + 1.0, pre.max(dim=0).values - 0.1
    eye = torch.eye(3, dtype=torch.float64)
    c = torch.cat([-eye, -eye])[:, None, :]
    d = torch.cat([-top, -bottom])[:, None]
    terms = Terms(c, d, torch.ones((6, 1), dtype=torch.bool))
    out = Search(chain, inputs, terms, 0.0, SearchOptions(batch=256, max_domains=20000), None,
                 None, partial=True).run()
    assert out.status != Status.VERIFIED
    assert set(out.open_terms) == {3, 4, 5}


def test_shrinking_moves_the_bounds_of_neurons_left_unstable():
    """With `shrink`, the neurons no proof makes stable get bounds moved towards what the
    attack reaches (each a proof of the partial search): the deep layers' widths shrink, and
    every sampled pre-activation stays inside."""
    module, chain = _net(1, WIDTHS)
    inputs = _region("box", 1)
    steps = Steps(iterations=10)
    widths = {}
    for shrink in (0.0, 0.5):
        out = tighten_root(chain, inputs, steps, SearchOptions(batch=256),
                           TightenOptions(seconds=6.0, least=1, shrink=shrink), seed=1)
        pre = _pre_activations(module, _samples(inputs, 20000, 1))[:-1]
        for k, (lo, up) in enumerate(out.root.bounds):
            assert (pre[k] >= lo).all() and (pre[k] <= up).all(), (shrink, k)
        widths[shrink] = [float((up - lo).sum()) for lo, up in out.root.bounds]
    assert widths[0.5][0] == pytest.approx(widths[0.0][0])  # the first layer is exact
    assert sum(widths[0.5][1:]) < 0.9 * sum(widths[0.0][1:]), widths
