"""Small torch modules lipverify recognises in the layer view (and ships in its models)."""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """Input normalisation `(x - mean) / std`, per channel (dimension 1)."""

    def __init__(self, mean: list[float] | torch.Tensor, std: list[float] | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


class GroupSort(nn.Module):
    """Sorts each consecutive group of `group_size` features (1-Lipschitz, gradient-norm preserving).

    Anil, Lucas, Grosse, "Sorting out Lipschitz function approximation", ICML 2019.
    """

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        self.group_size = int(group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sort within groups of the flattened features."""
        flat = x.reshape(x.shape[0], -1, self.group_size)
        return flat.sort(dim=-1).values.reshape(x.shape)


class MaxMin(GroupSort):
    """GroupSort with groups of two."""

    def __init__(self) -> None:
        super().__init__(2)


class ResidualBlock(nn.Module):
    """`x + body(x)`."""

    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return x + self.body(x)
