"""An interrupted `certify` run (SIGINT or SIGKILL) resumed with --resume equals a full run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

N = 800  # many small fsynced batches: long enough to interrupt mid-way
ARGS = ["certify", "--backends", "spectral", "--eps", "0.1", "0.3", "--batch-size", "4",
        "--no-progress", "--json"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from lipverify.data import load_data

    x, y = load_data("digits")
    reps = -(-N // len(x))
    path = tmp_path_factory.mktemp("data") / "tiled.npz"
    np.savez(path, x=np.tile(x, (reps, 1, 1, 1))[:N], y=np.tile(y, reps)[:N])
    return path


def _run(data: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "lipverify.cli.main", *ARGS, "--data", str(data), "--out",
           str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupt_and_resume_matches_uninterrupted(tmp_path, sig, data):
    full = _run(data, tmp_path / "full.jsonl")
    out = tmp_path / "part.jsonl"
    cmd = [sys.executable, "-m", "lipverify.cli.main", *ARGS, "--data", str(data), "--out",
           str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 16:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    partial = [json.loads(x) for x in out.read_text().split("\n")[:-1] if x.strip()]
    assert 0 < len(partial) < 2 * N, "the run should have been interrupted mid-way"
    resumed = _run(data, out, "--resume")
    keys = [(r["index"], r["eps_key"]) for r in _records(out)]
    assert len(keys) == len(set(keys)) == 2 * N
    for key in ("n", "clean_accuracy", "certified"):
        assert resumed[key] == full[key]
