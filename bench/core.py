"""nnfit's two headline figures on the tutorial's exercise, next to the tutorial's own loop, in one process.

    python bench/core.py            # about a minute
    python bench/core.py --quick    # a few seconds: a smoke run, not a measurement

1. Training time until the test MSE on 10,000 fresh points is <= 1e-5 (and <= 1e-7) for
   y = x**2 + x on [0, 1], 1000 samples, 1 -> 100 -> 100 -> 1 tanh: nnfit's default recipe against a
   hand-written Dataset + DataLoader loop with Adam, lr 1e-3, batch 32 (the tutorial's recipe).
   Test evaluations are not timed; imports are excluded.
2. Training samples per second for the same network at batch 64 and 1024: nnfit (Adam at that batch
   size) against the same hand-written Dataset + DataLoader loop.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import case_data, fmt_e, fmt_s, load_report, machine, table, time_to  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short budgets: checks the script runs")
    p.add_argument("--budget", type=float, default=None, help="seconds of training for the loop (default 10)")
    args = p.parse_args()
    budget = args.budget or (1.0 if args.quick else 10.0)
    seconds = 0.2 if args.quick else 2.0

    import torch  # noqa: F401  (imported before the clocks start)

    import nnfit.api  # noqa: F401
    from _tools import train_loop, train_nnfit
    from throughput import rate_dataloader, rate_nnfit

    print(f"bench/core.py: {machine()}; {load_report()}", flush=True)
    data = case_data("tutorial")
    mine = train_nnfit(*data, budget=budget)
    loop = train_loop(*data, budget=budget, stop_mse=1e-5)
    rows = []
    for name, r in (("nnfit (default recipe)", mine), ("Dataset + DataLoader loop, Adam lr 1e-3, batch 32", loop)):
        t5, t7 = time_to(r["trace"], 1e-5), time_to(r["trace"], 1e-7)
        rows.append([name, fmt_s(t5) if t5 is not None else f"> {r['seconds']:.1f} s",
                     fmt_s(t7) if t7 is not None else "-", fmt_e(min(m for _, m in r["trace"])), fmt_s(r["seconds"])])
    print(table(["tutorial exercise", "time to test MSE <= 1e-5", "to <= 1e-7", "best test MSE", "trained for"],
                rows, "time to accuracy (training time; test evaluations and imports excluded)"))
    print(f"nnfit's recipe: {mine['recipe']}")

    rows = []
    for batch in (64, 1024):
        a, b = rate_nnfit(batch, seconds), rate_dataloader(batch, seconds)
        rows.append([batch, f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.2f}x"])
    print(table(["batch", "nnfit samples/s", "Dataset + DataLoader loop samples/s", "nnfit / loop"], rows,
                "training throughput, 1 -> 100 -> 100 -> 1 tanh, Adam"))
    print(f"\nload after the run: {load_report()}")


if __name__ == "__main__":
    main()
