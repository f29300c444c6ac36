"""Ensembles: K stacked members trained as one computation, against one member; and what the ensemble's
spread says.

    python bench/ensemble.py            # about ten minutes on 2 CPU cores
    python bench/ensemble.py --quick    # a few seconds: a smoke run, not a measurement

1. Speed: K = 8 members of the tutorial network (1 -> 100 -> 100 -> 1 tanh), Adam, fixed epochs over
   16,384 samples of y = x**2 + x, against one member (the same run with --ensemble 1), at batch 64 and
   1024 on the CPU, and at batch 1024 on a GPU when one is present (there over 1,048,576 samples, so
   that the step, captured as one CUDA graph, and not the capture or the per-epoch work, is measured;
   a note under the table says whether each run's step was captured). Training seconds come from nnfit's
   own summary: after a warm-up run of each, 5 runs of each, alternating, and their medians, with each
   pair's ratio beside the ratio of the medians, since a shared machine's speed drifts. Achieved GFLOP/s
   is 6 x weights x samples/s x members, against a large fp32 matmul measured in the same run.
2. Uncertainty: on the tutorial exercise (x**2 + x on [0, 1]) and on sin(3*x)*exp(-x) over [0, 3], an
   ensemble of 8 with nnfit's default recipe (and with Adam): the ensemble mean's test MSE against the
   median member's, the mean std outside the training domain against inside it, the rank correlation
   between |error| and std, and the coverage of the mean +- 2 std band on the test points.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_e, keeping_lines, load_report, machine, table  # noqa: E402

WEIGHTS = 1 * 100 + 100 + 100 * 100 + 100 + 100 * 1 + 1  # the tutorial network's parameters


def train_seconds(batch: int, epochs: int, n: int, device: str, repeats: int,
                  lines: dict) -> dict[int, tuple[list[float], list]]:
    """nnfit's own training seconds for K = 1 and K = 8, ``repeats`` runs each, alternating (after a warm-up
    run of each), and the CPU threads each run chose; a run's lines about its step (captured as a CUDA graph
    or not) go to ``lines[K]`` with the rest of its log. Alternating spreads a drift in the machine's speed over both."""
    import numpy as np
    import pandas as pd

    import nnfit

    x = np.random.default_rng(0).uniform(0, 1, n)
    frame = pd.DataFrame({"x": x, "y": x ** 2 + x})
    common = dict(data=frame, target="y", optimizer="adam", batch_size=batch, val_split=0.0, patience=10 ** 6,
                  hidden=(100, 100), quiet=True, plots=False, device=device)
    out = {k: ([], []) for k in (1, 8)}
    for k in out:
        nnfit.fit(epochs=1, ensemble=k, **common)  # warm-up
    for _ in range(repeats):
        for k, (seconds, threads) in out.items():
            summary = nnfit.fit(epochs=epochs, ensemble=k, reporter=keeping_lines(lines[k]), **common).summary
            seconds.append(summary["train_seconds"])
            threads.append(summary.get("threads"))
    return out


def matmul_gflops(device: str) -> float:
    import torch

    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    a @ b
    best = float("inf")
    for _ in range(3):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best / 1e9


def speed(quick: bool) -> None:
    import torch

    n, epochs = (2048, 1) if quick else (16384, 3)
    repeats = 1 if quick else 5
    cases = [("cpu", 64), ("cpu", 1024)] + ([("cuda", 1024)] if torch.cuda.is_available() else [])
    rows, notes = [], []
    for device, batch in cases:
        rows_n = n if device == "cpu" or quick else 1 << 20  # a GPU epoch of 16k rows is 16 steps: too few
        lines: dict = {1: [], 8: []}
        runs = train_seconds(batch, epochs, rows_n, device, repeats, lines)
        one, eight = (statistics.median(runs[k][0]) for k in (1, 8))
        ratios = sorted(b / a for a, b in zip(runs[1][0], runs[8][0]))
        if device != "cpu":
            notes += [f"{device}, batch {batch}, {k} member(s): {line}" for k in (1, 8)
                      for line in [line for line in lines[k] if "CUDA graph" in line][:1]]
            notes += [f"{device}, batch {batch}, {k} member(s): the step was NOT captured" for k in (1, 8)
                      if not any("captured as a CUDA graph" in line for line in lines[k])]
        rate = rows_n * epochs / eight
        peak = matmul_gflops(device)
        target = {("cpu", 64): "<= 2x", ("cuda", 1024): "<= 1.3x"}.get((device, batch), "none (compute-bound)")
        chose = lambda k: "/".join(map(str, sorted(set(runs[k][1]))))  # noqa: E731
        threads = "" if device != "cpu" else f" ({chose(1)} / {chose(8)})"
        spread = f"{ratios[0]:.2f}x-{ratios[-1]:.2f}x" if len(ratios) > 1 else "-"
        rows.append([f"{device}{threads}", batch, f"{one:.2f} s", f"{eight:.2f} s", f"{eight / one:.2f}x", spread, target,
                     f"{6 * WEIGHTS * rate * 8 / 1e9:.1f}", f"{peak:.0f}"])
    print(table(["device (threads: 1 / 8 members)", "batch", "1 member", "8 members", "8 / 1", "8 / 1, each pair",
                 "target", "8 members GFLOP/s", "2048^2 matmul GFLOP/s"], rows,
                f"K = 8 stacked members vs one, 1 -> 100 -> 100 -> 1 tanh, Adam, {epochs} epochs of {n} samples, "
                f"median of {repeats} runs each"
                + (" (on the GPU: 1048576)" if len(cases) > 2 and not quick else "")))
    for line in notes:
        print(f"- {line}")


def ranks(a):
    import numpy as np

    order = np.argsort(a)
    out = np.empty(len(a))
    out[order] = np.arange(len(a))
    return out


def uncertainty(quick: bool) -> None:
    import numpy as np
    import torch

    import nnfit

    cases = [("x**2 + x", (0.0, 1.0), (1.0, 4 / 3)), ("sin(3*x)*exp(-x)", (0.0, 3.0), (3.0, 4.0))]
    recipes = [("adam, 2 epochs", {"optimizer": "adam", "epochs": 2})] if quick else \
        [("default (auto)", {}), ("adam", {"optimizer": "adam"})]
    samples = 300 if quick else 1000
    rows = []
    for formula, (low, high), (out_low, out_high) in cases:
        for name, settings in recipes:
            t = time.perf_counter()
            model = nnfit.fit(formula=formula, domain={"x": (low, high)}, ensemble=8, quiet=True, plots=False,
                              samples=samples, test_samples=samples, **settings)
            seconds = time.perf_counter() - t
            rng = np.random.default_rng(1)
            x_in = rng.uniform(low, high, 2 * samples)
            y_in = x_in ** 2 + x_in if formula.startswith("x") else np.sin(3 * x_in) * np.exp(-x_in)
            members = model.member_predictions(torch.tensor(x_in[:, None]))[:, :, 0].numpy()
            mean, std = members.mean(0), members.std(0, ddof=1)
            member_mse = ((members - y_in) ** 2).mean(1)
            mean_mse = ((mean - y_in) ** 2).mean()
            _, std_out = model.predict(np.linspace(out_low, out_high, 200)[:, None], return_std=True)
            err = np.abs(mean - y_in)
            rank_corr = np.corrcoef(ranks(err), ranks(std))[0, 1]
            coverage = (err <= 2 * std).mean()
            rows.append([formula, name, model.summary["recipe"].split(" (")[0].split(",")[0], f"{seconds:.1f} s",
                         fmt_e(mean_mse), fmt_e(float(np.median(member_mse))),
                         f"{std_out.mean() / std.mean():.1f}x", f"{rank_corr:+.2f}", f"{coverage:.0%}"])
    print(table(["function", "recipe", "optimizer", "seconds", "mean's test MSE", "median member's",
                 "std outside / inside", "rank corr |err| vs std", "+-2 std coverage"], rows,
                "ensembles of 8: accuracy and uncertainty (outside: [1, 4/3] for x**2 + x, [3, 4] for the sine)"))
    print("\nOn a noiseless smooth fit the members agree closely inside the domain, so the spread there is tiny "
          "and tracks the error only loosely (a low rank correlation, a low coverage); outside the domain the "
          "members disagree, and the std grows: that is the signal an ensemble gives.")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    args = p.parse_args()
    import torch  # noqa: F401  (imported before the clocks start)

    import nnfit.api  # noqa: F401

    print(f"bench/ensemble.py: {machine()}; {load_report()}", flush=True)
    speed(args.quick)
    uncertainty(args.quick)
    print(f"\nload after the run: {load_report()}")


if __name__ == "__main__":
    main()
