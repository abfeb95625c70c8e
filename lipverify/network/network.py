"""`Network`: a model in eval mode on a device, with its normalised layer view."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lipverify.errors import UnsupportedLayerError
from lipverify.network.layers import Layer, Shape, run_layers


@dataclass(frozen=True, eq=False)
class Network:
    """A model ready to verify.

    `module` is the original model (eval mode, on `device`); `layers` its normalised view, or
    None when a layer is not supported, with `unsupported` saying which. `input_shape` excludes
    the batch dimension.
    """

    module: torch.nn.Module
    input_shape: Shape
    num_outputs: int
    layers: tuple[Layer, ...] | None
    unsupported: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    name: str = "network"

    @property
    def input_size(self) -> int:
        """Number of scalar inputs."""
        return math.prod(self.input_shape)

    @property
    def fingerprint(self) -> str:
        """A content hash of the weights and the layer structure (cache key)."""
        return _fingerprint(self.module, self.input_shape)

    def forward(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Outputs of the original module as a float64 array (batch first)."""
        with torch.no_grad():
            t = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=self.device)
            t = t.reshape((t.shape[0], *self.input_shape))
            return self.module(t).reshape(t.shape[0], -1).double().cpu().numpy()

    def require_layers(self) -> tuple[Layer, ...]:
        """The layer view, or an `UnsupportedLayerError` naming the layer and what still runs."""
        if self.layers is None:
            raise UnsupportedLayerError(self.unsupported or "(no layer view)")
        return self.layers

    def layer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs computed from the layer view (float64 unless `x` is float32)."""
        return run_layers(self.require_layers(), x.reshape((x.shape[0], *self.input_shape)))


def _fingerprint(module: torch.nn.Module, input_shape: Shape) -> str:
    digest = hashlib.sha256(repr(tuple(input_shape)).encode())
    digest.update(repr(module).encode())
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]
