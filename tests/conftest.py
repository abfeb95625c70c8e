"""Shared test set-up: tests import the exact references beside them; one torch thread.

Many tiny tensor operations run faster on one thread than on an oversubscribed pool, and the
suite's timings stay stable on the 2-core CI machine.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
