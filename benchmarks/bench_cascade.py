"""The default `certify` cascade on a real MLP, as a new user runs it, beside alpha-CROWN alone.

    .venv/bin/python benchmarks/bench_cascade.py [--limit 200] [--eps 0.3]
        [--model ../shared/benchmarks/vnncomp/mnist_fc_2022/onnx/mnist-net_256x2.onnx]

Runs `lipverify certify --model M --data D --norm 2 --eps E --out R --json` as its own process
on SDP-CROWN's 200 MNIST images (flattened to the model's input shape), watching R to time the
first record, then alpha-CROWN alone (the `alpha-crown` backend, auto_LiRPA) on the same images
in this process. The CLI starts with an empty LipSDP cache. Prints verified counts (the
cascade's per-input best, and alpha-CROWN's), the cascade's first-record and total seconds,
and the ratio best / alpha-CROWN. Exit 1 when the cascade verifies an input an L2 PGD attack
breaks in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lipverify.backends.registry import BackendRegistry
from lipverify.network.load import load_network
from lipverify.types import Perturbation, Problem, Status

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "benchmarks"
MODEL = SHARED / "vnncomp" / "mnist_fc_2022" / "onnx" / "mnist-net_256x2.onnx"
IMAGES = SHARED / "l2_sdpcrown"


def run_cli(model: Path, data: Path, eps: float, out: Path) -> tuple[dict, float, float]:
    """The CLI's JSON summary, seconds to its first record, and its total seconds.

    The run gets an empty LipSDP cache (as a new user's first run), not this machine's.
    """
    cmd = [sys.executable, "-m", "lipverify.cli.main", "certify", "--model", str(model),
           "--data", str(data), "--norm", "2", "--eps", str(eps), "--out", str(out), "--json",
           "--no-progress"]
    env = {**os.environ, "LIPVERIFY_CACHE_DIR": str(out.parent / "cache")}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and out.read_text().strip():
            first = time.monotonic() - start
        time.sleep(0.05)
    total = time.monotonic() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"certify failed:\n{stderr}")
    return json.loads(stdout), first if first is not None else total, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--eps", type=float, default=0.3)
    args = parser.parse_args(argv)
    network = load_network(str(args.model))
    x = np.load(IMAGES / "mnist_images.npy")[:args.limit].astype(np.float32)
    y = np.load(IMAGES / "mnist_labels.npy")[:args.limit].astype(np.int64)
    x = x.reshape((len(x), *network.input_shape))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mnist.npz"
        np.savez(data, x=x, y=y)
        out = Path(tmp) / "records.jsonl"
        _, first, total = run_cli(args.model, data, args.eps, out)
        records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    best = {r["index"] for r in records if r["status"] == "verified"}
    registry = BackendRegistry.from_entry_points()
    problem = Problem.robustness(x, y, network.num_outputs, Perturbation.ball(2, args.eps))
    start = time.monotonic()
    alpha = registry.create("alpha-crown").certify(network, problem)
    alpha_s = time.monotonic() - start
    alpha_ok = {i for i, c in enumerate(alpha) if c.status == Status.VERIFIED}
    attack = registry.create("attack").certify(network, problem)
    broken = {i for i, c in enumerate(attack) if c.status == Status.FALSIFIED}
    print(f"{args.model.name}, L2 eps {args.eps}, {len(x)} images")
    print("| | verified | seconds |\n|---|---|---|")
    print(f"| cascade best (certify defaults) | {len(best)} | {total:.1f} "
          f"(first record {first:.1f}) |")
    print(f"| alpha-CROWN alone | {len(alpha_ok)} | {alpha_s:.1f} |")
    print(f"| PGD ceiling | {len(x) - len(broken)} | |")
    print(f"best / alpha-CROWN = {len(best) / max(len(alpha_ok), 1):.3f}; only alpha-CROWN: "
          f"{sorted(alpha_ok - best)}")
    wrong = sorted(best & broken)
    if wrong:
        print(f"UNSOUND: verified but broken by PGD: {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
