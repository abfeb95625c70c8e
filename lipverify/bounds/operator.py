"""Input-independent facts about each block's linear part: row norms and an operator-norm bound.

Both are computed once per network (the backend caches them by weight fingerprint).

- Row norms `||e_i^T T_k||_2` are exact: the rows are materialised by the adjoint, in chunks.
- `||T_k||_2` is bounded from above: by the spectral backend's `layer_norm_bound` when
  `lipverify.norms` provides it, else exactly through the eigenvalues of the smaller Gram matrix
  when it is small enough, else by the Schur test `sqrt(||T||_1 ||T||_inf)` (sound, looser).
  Exact eigenvalues carry float64 rounding only; `NORM_REL_SLACK` inflates every value.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass

import torch

from lipverify.bounds.chain import Block, Chain

log = logging.getLogger(__name__)

# Rows materialised at once when computing row norms / explicit matrices.
ROW_CHUNK = 1024
# Largest side of the Gram matrix whose eigenvalues are computed exactly.
EXACT_GRAM_SIDE = 2600
# Relative inflation of every computed norm (covers float64 rounding of SVD/eigenvalues).
NORM_REL_SLACK = 1e-9


@dataclass(frozen=True, eq=False)
class BlockNorms:
    """Per block: exact row norms `(n_out,)` and an upper bound of the operator norm."""

    row_norms: tuple[torch.Tensor, ...]
    op_norms: tuple[float, ...]


def _rows(block: Block, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of the block's linear part as a `(stop - start, in_size)` matrix."""
    eye = torch.zeros(stop - start, block.out_size, dtype=torch.float64)
    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    rows, _ = block.backward(eye.reshape((stop - start, *block.out_shape)))
    return rows.reshape(stop - start, -1)


def row_norms(block: Block) -> torch.Tensor:
    """Exact L2 norms of the rows of the block's linear part."""
    out = []
    for start in range(0, block.out_size, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, block.out_size)
        out.append(torch.linalg.vector_norm(_rows(block, start, stop), dim=1))
    return torch.cat(out)


def _gram_norm(block: Block) -> float:
    """`||T||_2` from the largest eigenvalue of the smaller Gram matrix (exact up to rounding)."""
    gram = torch.zeros(min(block.in_size, block.out_size), min(block.in_size, block.out_size),
                       dtype=torch.float64)
    if block.out_size <= block.in_size:  # T T^T from the rows
        rows = torch.cat([_rows(block, s, min(s + ROW_CHUNK, block.out_size))
                          for s in range(0, block.out_size, ROW_CHUNK)])
        gram = rows @ rows.T
    else:  # T^T T from the columns: T applied to the identity, then the adjoint
        cols = []
        for s in range(0, block.in_size, ROW_CHUNK):
            e = min(s + ROW_CHUNK, block.in_size)
            eye = torch.zeros(e - s, block.in_size, dtype=torch.float64)
            eye[torch.arange(e - s), torch.arange(s, e)] = 1.0
            zero = torch.zeros((1, *block.in_shape), dtype=torch.float64)
            img = block.forward(eye.reshape((e - s, *block.in_shape))) - block.forward(zero)
            cols.append(img.reshape(e - s, -1))
        mat = torch.cat(cols)
        gram = mat @ mat.T
    top = float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0))
    return math.sqrt(top)


def _schur_norm(block: Block) -> float:
    """`sqrt(||T||_1 ||T||_inf)` via the absolute matrix's max row and column sums."""
    abs_block = Block(tuple(_abs_layer(layer) for layer in block.layers), block.in_shape,
                      block.out_shape)
    ones_in = torch.ones((1, *block.in_shape), dtype=torch.float64)
    zero = torch.zeros_like(ones_in)
    row_sums = abs_block.forward(ones_in) - abs_block.forward(zero)
    col_sums, _ = abs_block.backward(torch.ones((1, *block.out_shape), dtype=torch.float64))
    return math.sqrt(float(row_sums.max()) * float(col_sums.max()))


def _abs_layer(layer: object) -> object:
    """The same layer with absolute weights and no bias or shift (for the Schur test)."""
    from dataclasses import replace

    from lipverify.network.layers import Conv, Dense, Shift

    if isinstance(layer, (Dense, Conv)):
        return replace(layer, weight=layer.weight.abs(), bias=torch.zeros_like(layer.bias))
    if isinstance(layer, Shift):
        return replace(layer, shift=torch.zeros_like(layer.shift))
    return layer


def _library_norm(block: Block) -> float | None:
    """The spectral backend's sound per-layer bound of the block (product), if available."""
    try:
        norms = importlib.import_module("lipverify.norms")
        bound = norms.layer_norm_bound
    except (ImportError, AttributeError):
        return None
    value = 1.0
    try:
        for layer in block.affine_layers():
            value *= float(bound(layer))
    except (TypeError, ValueError, NotImplementedError) as exc:  # an API we do not know yet
        log.debug("lipverify.norms.layer_norm_bound unusable here: %s", exc)
        return None
    return value


def operator_norm(block: Block) -> float:
    """A sound upper bound of `||T||_2` for the block's linear part."""
    if not block.affine_layers():
        return 1.0 + NORM_REL_SLACK  # shifts and reshapes only
    candidates = []
    library = _library_norm(block)
    if library is not None:
        candidates.append(library)
    if min(block.in_size, block.out_size) <= EXACT_GRAM_SIDE:
        candidates.append(_gram_norm(block))
    if not candidates:
        candidates.append(_schur_norm(block))
    return min(candidates) * (1 + NORM_REL_SLACK)


def block_norms(chain: Chain) -> BlockNorms:
    """Row norms and operator-norm bounds of every block (input independent)."""
    rows = tuple(row_norms(b) for b in chain.blocks)
    ops = tuple(operator_norm(b) for b in chain.blocks)
    log.debug("block operator norms: %s", ops)
    return BlockNorms(rows, ops)
