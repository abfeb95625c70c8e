"""`lipverify.bab.interm`: a sub-domain's own pre-activation bounds contain every sampled
pre-activation of the sub-domain, are tighter than the root's, and in float32 (with its
allowance) are never above the float64 ones."""

from __future__ import annotations

import pytest
import torch

from lipverify.bab.interm import Interm, refine
from lipverify.bab.optimise import Steps
from lipverify.bab.relaxed import abs_chain, cast_chain, outward
from lipverify.bab.root import root_relaxation
from tests.bab.test_relaxed import _net, _pre_activations, _region, _samples


def _domains(module, root, inputs, count, seed):
    """Split signs of `count` sub-domains, each the sign pattern of a sampled point on a few
    root-unstable neurons (so none is empty), and the samples with their pre-activations."""
    gen = torch.Generator().manual_seed(seed)
    x = _samples(inputs, 20000, seed)
    pre = _pre_activations(module, x)[:-1]
    splits = [torch.zeros(count, len(lo), dtype=torch.int8) for lo, _ in root]
    for b in range(count):
        point = int(torch.randint(len(x), (1,), generator=gen))
        for k, (lo, up) in enumerate(root):
            unstable = torch.nonzero((lo < 0) & (up > 0)).flatten()
            pick = unstable[torch.randperm(len(unstable), generator=gen)[:3]]
            splits[k][b, pick] = torch.where(pre[k][point, pick] >= 0, 1, -1).to(torch.int8)
    return splits, pre


@pytest.mark.parametrize("kind", ["box", "ball"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refined_bounds_contain_every_sampled_pre_activation(kind, seed):
    module, chain = _net(seed, (5, 24, 24, 24, 3))
    inputs = _region(kind, seed)
    relaxation = root_relaxation(chain, inputs, Steps(iterations=10))
    root = relaxation.bounds
    count = 12
    splits, pre = _domains(module, root, inputs, count, seed)
    sound = Interm.of([(lo[None], up[None]) for lo, up in root], relaxation.slopes)
    lower, upper = sound.start(count)
    refine(chain, inputs, sound, lower, upper, splits, 0, abs_chain(chain))

    fast_chain = cast_chain(chain, torch.float32, "cpu")
    fast = Interm(outward(sound.root, torch.float32), sound.index, sound.slopes)
    lower32, upper32 = fast.start(count)
    refine(fast_chain, inputs.to(torch.float32, "cpu"), fast, lower32, upper32, splits, 0,
           abs_chain(fast_chain), 2.0**-24)

    tighter = 0
    for b in range(count):
        inside = torch.ones(len(pre[0]), dtype=torch.bool)
        for k, s in enumerate(splits):
            sign = s[b].double()
            inside &= ((pre[k] * sign) >= 0).all(dim=1)
        assert inside.sum() > 0
        for k, index in enumerate(sound.index):
            z = pre[k][inside][:, index]
            for lo, up in ((lower, upper), (lower32, upper32)):
                assert (z >= lo[k][b].double() - 1e-12).all()
                assert (z <= up[k][b].double() + 1e-12).all()
            assert (lower32[k][b].double() <= lower[k][b] + 1e-12).all()
            assert (upper32[k][b].double() >= upper[k][b] - 1e-12).all()
            tighter += int((lower[k][b] > root[k][0][index] + 1e-9).sum())
    assert tighter > 0
