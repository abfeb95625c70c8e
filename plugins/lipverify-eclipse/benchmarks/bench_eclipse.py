"""ECLipsE / ECLipsE-Fast against lipverify's spectral and lipsdp backends: bound and time.

    python plugins/lipverify-eclipse/benchmarks/bench_eclipse.py [--skip-sdp] [--nets mlp,random]

Networks: the shipped digits MLP (64-64-32-10) and a random 784-256-256-10 ReLU MLP (PyTorch's
default initialisation, seed 0). Every bound is a proven L2 bound of the whole network; the lower
bound is the largest sampled Jacobian norm (`lipverify.testing.jacobian_lower_bound`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plug-in's source tree

from lipverify.backends.lipsdp import LipSDPBackend
from lipverify.backends.spectral import SpectralBackend
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.testing import jacobian_lower_bound, make_network
from lipverify.types import Norm

from lipverify_eclipse import EclipseBackend, EclipseFastBackend, EclipseOptions


def random_mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-sdp", action="store_true", help="Leave out ECLipsE (SDP).")
    parser.add_argument("--nets", default="mlp,random")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    nets = {"digits_mlp": lambda: make_network(load_shipped("digits_mlp"), INPUT_SHAPE, "mlp"),
            "random 784-256-256-10": lambda: make_network(random_mlp(), (784,), "random")}
    wanted = args.nets.split(",")
    backends = [SpectralBackend(), EclipseFastBackend()]
    if not args.skip_sdp:
        backends.append(EclipseBackend(EclipseOptions(max_sdp_width=1024)))
    # A fresh bound cache, so LipSDP's time is a solve, not a disk read.
    backends.append(LipSDPBackend(LipSDPBackend.Options(cache_dir=tempfile.mkdtemp())))
    print(f"{'network':<24} {'backend':<13} {'L2 bound':>10} {'/ lower':>8} {'seconds':>9}")
    for label, build in nets.items():
        if not any(w in label for w in wanted):
            continue
        net = build()
        lower = jacobian_lower_bound(net.module, net.input_shape, Norm.L2, samples=512)
        for backend in backends:
            start = time.perf_counter()
            bound = backend.lipschitz(net, Norm.L2)
            seconds = time.perf_counter() - start
            print(f"{label:<24} {backend.name:<13} {bound.value:>10.4f} "
                  f"{bound.value / lower:>8.3f} {seconds:>9.2f}", flush=True)
        print(f"{label:<24} {'lower bound':<13} {lower:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
