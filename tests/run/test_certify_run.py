"""`iter_records`: small first batches, per-backend stage reports, a pooled time budget."""

import time

import numpy as np
import pytest

from lipverify.backends.attack import AttackBackend
from lipverify.backends.l2prop import L2PropBackend, L2PropOptions
from lipverify.backends.spectral import SpectralBackend
from lipverify.data import load_data
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.load import build_network
from lipverify.orchestrator import Mode
from lipverify.run.certify import CertifyJob, TimeBudget, batch_sizes, iter_records
from lipverify.run.summary import format_table, summarise
from lipverify.types import Norm


@pytest.fixture(scope="module")
def digits():
    x, y = load_data("digits")
    return build_network(load_shipped("digits_mlp"), INPUT_SHAPE), x, y


def test_batches_start_small_and_double_up_to_the_batch_size():
    assert list(batch_sizes(300, 64, 16)) == [16, 32, 64, 64, 64, 60]
    assert list(batch_sizes(5, 256, 16)) == [5]
    assert list(batch_sizes(0, 256)) == []
    assert list(batch_sizes(10, 3, 16)) == [3, 3, 3, 1]


def test_time_budget_is_pooled_and_capped_by_the_total():
    budget = TimeBudget(per_input=2.0, total=30.0)
    first = budget.next_deadline(4)
    assert first == pytest.approx(budget.start + 8.0)
    assert budget.next_deadline(8) == pytest.approx(budget.start + 24.0)
    assert budget.next_deadline(16) == pytest.approx(budget.start + 30.0)
    assert TimeBudget(None, None).next_deadline(10) is None


def test_first_records_come_after_the_first_small_batch_and_stages_name_backends(digits):
    network, x, y = digits
    backends = (SpectralBackend(), AttackBackend())
    job = CertifyJob(x[:100], y[:100], (0.3,), Norm.L2, backends, batch_size=64)
    stages: list[tuple[str, int]] = []
    batches = iter_records(network, job, stage=lambda name, n: stages.append((name, n)))
    first = next(batches)
    # the inputs the attack (the first stage) settles are yielded before spectral runs
    assert stages == [("attack", 16)]
    assert first and {r["index"] for r in first} <= set(range(16))
    assert all(r["status"] == "falsified" and list(r["per_backend"]) == ["attack"]
               for r in first)
    rest = [r for batch in batches for r in batch]
    assert sorted(r["index"] for r in first + rest) == list(range(100))
    assert [name for name, _ in stages][:2] == ["attack", "spectral"]


def test_a_spent_time_budget_ends_inputs_as_timeout_not_as_a_verdict(digits):
    """With a 1 ms per-input budget l2prop stops early (what it bounded by then may still be
    verified, soundly): the rest ends as `timeout`, promptly; without a budget no input times
    out."""
    network, x, y = digits
    slow = (L2PropBackend(L2PropOptions(iterations=100)),)
    tight = CertifyJob(x[:32], y[:32], (0.3,), Norm.L2, slow, time_per_input=1e-3)
    start = time.monotonic()
    records = [r for batch in iter_records(network, tight) for r in batch]
    spent = time.monotonic() - start
    free = CertifyJob(x[:32], y[:32], (0.3,), Norm.L2, slow)
    start = time.monotonic()
    unlimited = [r for batch in iter_records(network, free) for r in batch]
    assert spent < 0.5 * (time.monotonic() - start)
    assert "timeout" in {r["status"] for r in records} <= {"timeout", "verified"}
    assert "timeout" not in {r["status"] for r in unlimited}
    assert sum(r["status"] == "verified" for r in records) <= \
        sum(r["status"] == "verified" for r in unlimited)


def test_the_table_says_what_its_columns_count(digits):
    network, x, y = digits
    for mode, says in (("budget", "not what it proves alone"), ("radius", "every backend ran")):
        job = CertifyJob(x[:20], y[:20], (0.3,), Norm.L2, (SpectralBackend(),),
                         mode=Mode(mode))
        records = [r for batch in iter_records(network, job) for r in batch]
        summary = summarise(records, (0.3,), ["spectral"])
        assert says in format_table(summary, ["spectral"], "2", mode)
