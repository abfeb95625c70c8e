"""What the branch and bound needs from a network and one input's problem: the ReLU chain,
the region as an `InputSet`, the property as `Terms`, and the region for the leaf LPs."""

from __future__ import annotations

import numpy as np
import torch

from lipverify.bab.relaxed import InputSet
from lipverify.bab.pool import Terms
from lipverify.backends._leaf_lp import LeafRegion, relu_layers
from lipverify.backends._margin_search import Region, Spec
from lipverify.bounds.chain import Chain, build_chain
from lipverify.errors import ModelError
from lipverify.network.network import Network
from lipverify.types import Norm


def chain_of(network: Network) -> Chain | None:
    """The network's ReLU chain (float64), or None when its layer view is not one."""
    if network.layers is None or relu_layers(network.layers) is None:
        return None
    try:
        return build_chain(network.layers, network.input_shape)
    except ModelError:
        return None


def input_set(region: Region, device: torch.device) -> InputSet:
    """The one input's region as a flat float64 box or L2 ball."""
    def flat(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1), device=device)

    centre = flat(region.centres[0])
    if region.is_box:
        return InputSet.box(flat(region.lower[0]), flat(region.upper[0]))
    eps = float(region.eps[0])
    if region.norm == Norm.L2:
        return InputSet.ball(centre, eps)
    return InputSet.box(centre - eps, centre + eps)


def terms_of(spec: Spec, device: torch.device) -> Terms:
    """The one input's property as `Terms` (rows whose fill is NaN are real)."""
    shape = (spec.terms, spec.rows)
    c = torch.as_tensor(spec.c[0].reshape(*shape, -1), dtype=torch.float64, device=device)
    d = torch.as_tensor(spec.d[0].reshape(shape), dtype=torch.float64, device=device)
    valid = torch.as_tensor(np.isnan(spec.fill[0]).reshape(shape), device=device)
    return Terms(c, d, valid)


def leaf_region(region: Region) -> LeafRegion:
    """The one input's region for the leaf LPs."""
    centre = region.centres[0].reshape(-1).astype(np.float64)
    if region.is_box:
        lower, upper = region.lower[0].reshape(-1), region.upper[0].reshape(-1)
    else:
        lower, upper = centre - region.eps[0], centre + region.eps[0]
    return LeafRegion(lower.astype(np.float64), upper.astype(np.float64), centre,
                      region.norm, float(region.eps[0]))
