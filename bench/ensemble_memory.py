"""Ensemble memory: the estimate that refuses an ensemble too large for its device (and names the most
members that fit) against the memory a run actually takes, and what halving the rows saves.

    python bench/ensemble_memory.py            # about a minute on 2 CPU cores
    python bench/ensemble_memory.py --quick    # a few seconds: a smoke run, not a measurement

Each row is a fresh process that trains (``train.train``: the loop, without the final evaluation) K
members of 1 -> W -> W -> 1 tanh with Adam for 2 epochs (so that the loop replaces its rollback snapshot
once) on the CPU, in float32, one thread. Measured: the peak resident set during training minus the
resident set before it, plus the weights (built before, and part of the estimate), less the same for a
2-member 1 -> 1 -> 1 network beyond its estimate (what any run takes: torch's lazily loaded kernels,
threads and allocator).
The estimate is ``model.training_memory`` as the training loop computes it (``train.memory_estimate``);
"state" is its part that does not depend on the rows per step, which halving the rows cannot free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine, table  # noqa: E402

CHILD = r"""
import json, os, resource, sys
import torch
from nnfit import train
from nnfit.config import Config
from nnfit.model import build_mlp
from nnfit.progress import Reporter
members, width, batch, n = map(int, sys.argv[1:5])
config = Config(ensemble=members, hidden=(width, width), optimizer="adam", batch_size=batch, epochs=2, patience=10)
x = torch.rand(n + n // 8, 1)
data = train.TrainData(x[:n], x[:n] ** 2 + x[:n], x[n:], x[n:] ** 2 + x[n:])
model = build_mlp(1, 1, config)
estimate = train.memory_estimate(model, config, train.choose_recipe(config, n, members), n)
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
before = resident() - weights  # the weights are part of the estimate
train.train(model, data, config, Reporter(quiet=True))
print(json.dumps({"used": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
                  "total": estimate.total(), "state": members * (estimate.state + estimate.rows)}))
"""


def run(members: int, width: int, batch: int, n: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(members), str(width), str(batch), str(n)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    width, n = (64, 512) if args.quick else (512, 4096)
    cases = [(4, 64), (8, 1024)] if args.quick else [(4, 64), (8, 16), (8, 64), (8, 256), (8, 1024), (8, 4096)]
    base = run(2, 1, 64, n)  # what any run takes: torch's lazily loaded kernels, threads, the allocator
    rows = []
    for members, batch in cases:
        got = run(members, width, batch, n)
        measured = got["used"] - (base["used"] - base["total"])
        rows.append([members, batch, mb(got["state"]), mb(got["total"]), mb(measured),
                     f"{got['total'] / max(measured, 1):.2f}", f"{1 - got['state'] / got['total']:.0%}"])
    print(machine())
    print(table(["K", "batch", "estimate: state", "estimate: all", "measured peak", "estimate / measured",
                 "rows' share"], rows, f"K members of 1 -> {width} -> {width} -> 1, Adam, float32, CPU"))


if __name__ == "__main__":
    main()
