"""The public conformance kit on the bound-propagation backends (the full kit, with the attack
checks, runs in benchmarks/bench_lirpa.py)."""

import pytest
import torch

from lipverify.backends.lirpa import AlphaCrownBackend, LirpaBackend, LirpaOptions
from lipverify.backends.local_lipschitz import LocalLipschitzBackend
from lipverify.testing import check_backend

FAST_CHECKS = ["protocol", "supports_honest", "batch_invariance", "determinism"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("make", [LirpaBackend, LocalLipschitzBackend], ids=["lirpa", "local"])
def test_conformance_kit(make):
    check_backend(make(), checks=FAST_CHECKS, raise_on_failure=True)


@pytest.mark.slow
def test_conformance_kit_alpha_crown():
    check_backend(AlphaCrownBackend(LirpaOptions(alpha_iterations=5)), checks=FAST_CHECKS,
                  raise_on_failure=True)
