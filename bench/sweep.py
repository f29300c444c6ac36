"""Sweeps of 12 configurations against one default run of the same data (issue: "Many models at once").

    python bench/sweep.py                        # 4-input formula, 10,000 samples, the device nnfit picks
    python bench/sweep.py --device cpu --samples 2000 --factor 3.5
    python bench/sweep.py --device cpu --sweeps networks   # one of the two sweeps (half the time)
    python bench/sweep.py --quick                # 300 samples, 6 epochs: checks the script (tests/test_bench_smoke.py)

Target: a 12-configuration sweep finishes in at most 4x the wall time of one default run, and its winner's
test NMSE (MSE / variance of the true values, on 10,000 fresh points) is no worse than the default run's.

The default run is timed first; each sweep is then given ``--time-budget`` = FACTOR x that time (the
sweep's whole budget, shared out by successive halving). The rest of the 4x is the margin for what the
budget does not cover: building the samples, the test points of every configuration, saving. With
``--uncapped`` a sweep without a time budget (epoch caps only: 1/27, 1/9, 1/3 and all of the default
epochs) is measured too. The sweeps:

- networks: --hidden 32,32:64,64:100,100:64,64,64 --activation tanh,silu,gelu, the optimizer nnfit picks
  (full-batch L-BFGS at this size, as in the default run);
- the issue's example: --optimizer adam --lr 1e-3,3e-3,1e-2 --hidden 64,64:100,100 --activation tanh,silu.

Both grids list the configuration nnfit train would train with their options (100,100 tanh; with Adam, lr
3e-3), which the sweep trains first, in full, as its yardstick; the last column gives that run's test NMSE
from the sweep's own table (for the Adam sweep, the default run with --optimizer adam).
"""

import argparse
import os
import platform
import time

FORMULA = "sin(a)*cos(b) + 0.5*c**2 - 0.3*a*d"
DOMAIN = {"a": (-2, 2), "b": (-2, 2), "c": (-2, 2), "d": (-2, 2)}
NETWORKS = dict(hidden="32,32:64,64:100,100:64,64,64", activation="tanh,silu,gelu")
ADAM = dict(optimizer="adam", lr="1e-3,3e-3,1e-2", hidden="64,64:100,100", activation="tanh,silu")


def nmse(summary) -> float:
    return 1 - summary["test"]["r2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--factor", type=float, default=3.5, help="each sweep's --time-budget, in default runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads for every run (a busy machine: 1)")
    parser.add_argument("--uncapped", action="store_true", help="also time the networks sweep without a budget")
    parser.add_argument("--quick", action="store_true", help="300 samples and 6 epochs: checks the script only")
    parser.add_argument("--sweeps", default="networks,adam",
                        help="which budgeted sweeps to run: networks, adam or both (default: networks,adam)")
    args = parser.parse_args()
    quick = {"samples": 300, "epochs": 6, "test_samples": 1000} if args.quick else {}
    import torch

    import nnfit

    common = dict(formula=FORMULA, domain=DOMAIN, samples=args.samples, device=args.device, quiet=True, plots=False,
                  threads=args.threads)
    common.update(quick)
    nnfit.fit(**{**common, "samples": 200, "epochs": 2})  # imports and first-use costs, paid by neither side
    started = time.perf_counter()
    default = nnfit.fit(**common)
    default_s = time.perf_counter() - started
    budget = args.factor * default_s
    runs = [("networks x activations, epoch caps only", NETWORKS, None)] if args.uncapped else []
    chosen = set(args.sweeps.split(","))
    if not chosen or chosen - {"networks", "adam"}:
        parser.error(f"--sweeps takes networks, adam or networks,adam; got {args.sweeps!r}")
    if "networks" in chosen:
        runs.append((f"networks x activations, --time-budget {budget:.0f}", NETWORKS, budget))
    if "adam" in chosen:
        runs.append((f"the issue's example (adam, lr x networks x activations), --time-budget {budget:.0f}", ADAM,
                     budget))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device "
          f"{default.summary['device']}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}, threads {args.threads or 'nnfit default'}\n")
    print(f"`{FORMULA}` on [-2, 2]⁴, {common['samples']} samples; test NMSE on {default.config.test_samples:,} "
          "fresh points\n")
    print("| run | configurations | wall s | × default | test NMSE | winner | target met | its default config's NMSE |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| one default run ({default.summary['recipe'].split(' (')[0]}, 100,100 tanh, "
          f"{default.summary['epochs']} epochs) | 1 | {default_s:.1f} | 1.00 | {nmse(default.summary):.2e} | - | - | - |",
          flush=True)
    for name, swept, seconds in runs:
        settings = {k: v for k, v in swept.items() if k not in ("lr", "hidden", "activation")}
        started = time.perf_counter()
        result = nnfit.sweep(**common, **settings, lr=swept.get("lr"), hidden=swept["hidden"],
                             activation=swept["activation"], time_budget=seconds)
        wall = time.perf_counter() - started
        s, c = result.best.summary, result.best.config
        ratio = wall / default_s
        met = ratio <= 4 and nmse(s) <= nmse(default.summary)
        lr = "" if c.lr is None else f"lr {c.lr:g} "
        own = next((f"{r['test_nmse']:.2e}" for r in result.rows if r["config"] == s["sweep"]["default"]), "-")
        print(f"| sweep: {name} | {len(result.rows)} | {wall:.1f} | {ratio:.2f} | {nmse(s):.2e} "
              f"| {lr}{','.join(map(str, c.hidden))} {c.activation}, {s['epochs']} epochs ({s['stopped']}) "
              f"| {'yes' if met else 'no'} | {own} |", flush=True)


if __name__ == "__main__":
    main()
