"""The shipped default models: a small MLP and a small CNN trained on scikit-learn's digits.

Weights are state dicts inside the package (a few KB), made by `scripts/train_digits.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODEL_DIR = Path(__file__).parent
INPUT_SHAPE = (1, 8, 8)


def digits_mlp() -> nn.Sequential:
    """64-64-32-10 ReLU MLP."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def digits_cnn() -> nn.Sequential:
    """Two small convolutions (stride 2, padding 1) and two dense layers."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=1, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))


ARCHITECTURES = {"digits_mlp": digits_mlp, "digits_cnn": digits_cnn}


def shipped_path(name: str) -> Path:
    """Path of a shipped state dict."""
    return MODEL_DIR / f"{name}.pt"


def load_shipped(name: str = "digits_mlp") -> nn.Module:
    """A shipped model with its weights, in eval mode."""
    model = ARCHITECTURES[name]()
    model.load_state_dict(torch.load(shipped_path(name), weights_only=True))
    return model.eval()
