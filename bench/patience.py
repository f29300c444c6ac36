"""Early stopping under a one-cycle schedule: patience 20 (nnfit's default for Adam before) against training
every epoch of the schedule (the default now, unless --patience is given).

    python bench/patience.py            # about two minutes on 2 CPU cores
    python bench/patience.py --quick    # a few seconds: a smoke run, not a measurement

Adam's default schedule, one-cycle, holds the learning rate high for most of the run and anneals it at
the end. The validation loss stalls while the rate is high, so patience stops the run there, before the
annealing that gives most of the accuracy. Each row is one run of nnfit's defaults with --optimizer adam
(the recipe nnfit picks for large problems), on the CPU, test error on 10,000 fresh points.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_e, load_report, machine, table  # noqa: E402

CASES = [("sin(a)*cos(b) + 0.5*c**2 - 0.3*a*d", {k: (-2.0, 2.0) for k in "abcd"}, 3000),
         ("x**2 + x", {"x": (0.0, 1.0)}, 1000)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    import nnfit

    print(f"bench/patience.py: {machine()}; {load_report()}", flush=True)
    quick = {"epochs": 8, "samples": 200} if args.quick else {}
    rows = []
    for formula, domain, samples in CASES:
        for name, patience in (("--patience 20 (before)", 20), ("default: every epoch", None)):
            settings = {**dict(formula=formula, domain=domain, samples=samples, optimizer="adam", patience=patience,
                               device="cpu", quiet=True, plots=False), **quick}
            started = time.perf_counter()
            summary = nnfit.fit(**settings).summary
            seconds = time.perf_counter() - started
            rows.append([formula, summary["samples"]["train"], name, summary["epochs"], summary["best_epoch"],
                         summary["stopped"], fmt_e(1 - summary["test"]["r2"]), f"{seconds:.1f} s"])
    print(table(["function", "training rows", "early stopping", "epochs", "best epoch", "stopped", "test NMSE",
                 "seconds"], rows, "Adam with its one-cycle schedule: patience against the whole schedule"))
    print(f"\nload after the run: {load_report()}")


if __name__ == "__main__":
    main()
