"""Sound operator-norm and Lipschitz bounds of the normalised layer view.

`dense` (explicit matrices: SVD with slack, Gram iteration, rounding helpers), `conv` (the
operator a convolution really applies), `orthogonal` (near-orthogonal layers through their Gram
deviation), `network` (per-layer bounds and their products), and `power` (power iteration:
labelled lower estimates only).
"""

from lipverify.norms.conv import conv_gram_bound, conv_norm_bound, fantastic_four_bound
from lipverify.norms.dense import gram_bound, matrix_norm_bound, svd_bound
from lipverify.norms.network import (
    BoundOptions,
    LayerBound,
    NetworkBounds,
    layer_bound,
    layer_norm_bound,
    network_bounds,
    pairwise_lipschitz,
    prefix_bounds,
)
from lipverify.norms.orthogonal import (
    OrthogonalBound,
    dense_orthogonal_bound,
    grouped_orthogonal_bound,
)
from lipverify.norms.power import NormEstimate, layer_norm_estimate, power_iteration

__all__ = [
    "BoundOptions",
    "LayerBound",
    "NetworkBounds",
    "NormEstimate",
    "OrthogonalBound",
    "conv_gram_bound",
    "conv_norm_bound",
    "dense_orthogonal_bound",
    "fantastic_four_bound",
    "gram_bound",
    "grouped_orthogonal_bound",
    "layer_bound",
    "layer_norm_bound",
    "layer_norm_estimate",
    "matrix_norm_bound",
    "network_bounds",
    "pairwise_lipschitz",
    "power_iteration",
    "prefix_bounds",
    "svd_bound",
]
