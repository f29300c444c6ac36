"""The evidence for nnfit's default network: width, depth and activation, measured with the default recipe.

    python bench/defaults.py              # 3 cases x 8 networks, 3 s of training each
    python bench/defaults.py --budget 1   # quicker

Each network trains with nnfit's defaults otherwise (optimizer auto, which is full-batch L-BFGS at these
sizes) for at most --budget seconds, and is scored by its test MSE on 10,000 fresh points.
"""

import argparse
import os
import platform
import sys

CASES = {
    "tutorial x**2 + x (1000)": dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=1000),
    "a*sin(b) + c (5000)": dict(formula="a*sin(b) + c", domain={"a": (1, 5), "b": (0, 3.1416), "c": (-1, 1)},
                                samples=5000),
    "steep tanh(20(a - b**2)) + 0.2c (10000)": dict(formula="tanh(20*(a - b**2)) + 0.2*c",
                                                     domain={"a": (-1, 1), "b": (-1, 1), "c": (-1, 1)},
                                                     samples=10000),
}
NETWORKS = [((32, 32), "tanh"), ((64, 64), "tanh"), ((100, 100), "tanh"), ((200, 200), "tanh"),
            ((64, 64, 64), "tanh"), ((100, 100), "silu"), ((100, 100), "gelu"), ((100, 100), "relu")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of training per run (default 3)")
    args = parser.parse_args()
    import nnfit
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.2f}; budget {args.budget:g} s per run\n")
    header = ["network", *CASES]
    rows = []
    for hidden, activation in NETWORKS:
        row = [f"{'x'.join(map(str, hidden))} {activation}"]
        for case in CASES.values():
            m = nnfit.fit(**case, hidden=hidden, activation=activation, time_budget=args.budget,
                          quiet=True, plots=False)
            s = m.summary
            row.append(f"{s['test']['mse']:.2e} ({s['train_seconds']:.1f} s)")
            print(".", end="", file=sys.stderr, flush=True)
        rows.append(row)
    print(file=sys.stderr)
    print("test MSE on 10,000 fresh points (training seconds)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
