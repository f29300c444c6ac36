"""One CPU thread against two for one training step, by the work per step (rows x parameters).

    python bench/threads.py            # about 30 s on 2 cores
    python bench/threads.py --quick    # a smoke run

The network is the tutorial's 1 -> 100 -> 100 -> 1 tanh, alone (K = 1) or stacked as an ensemble of K,
trained with fused Adam; each cell is the best of 3 timings of a few hundred steps in this process. The
last row is one full-batch L-BFGS epoch (20 iterations, strong Wolfe line search) on the tutorial's 900
training rows, as `nnfit demo` trains it. nnfit gives a run one thread up to ``train.ONE_THREAD_MAX_WORK``
rows x parameters per forward pass (``ONE_THREAD_MAX_WORK_LBFGS`` for L-BFGS), where a second thread buys
little, and above it one thread per free core (``devices.cpu_threads``).
Run it on a quiet machine: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import load_report, machine, table  # noqa: E402

CASES = [(1, 64), (1, 256), (2, 64), (4, 64), (8, 64), (1, 1024), (8, 256)]


def step_microseconds(members: int, batch: int, threads: int, steps: int) -> tuple[float, int]:
    import torch

    from nnfit.model import MLP, StackedMLP

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = StackedMLP(members, 1, 1, (100, 100)) if members > 1 else MLP(1, 1, (100, 100))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x = torch.rand(members, batch, 1) if members > 1 else torch.rand(batch, 1)
    y = x ** 2 + x

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean(dim=(-2, -1))
        loss.sum().backward()
        optimizer.step()

    for _ in range(steps // 5):
        step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e6, batch * sum(p.numel() for p in model.parameters())


def lbfgs_epoch_microseconds(rows: int, threads: int, repeats: int) -> tuple[float, int]:
    import torch

    from nnfit.model import MLP
    from nnfit.train import LBFGS_ITERATIONS_PER_EPOCH

    torch.set_num_threads(threads)
    best = float("inf")
    for _ in range(repeats):
        torch.manual_seed(0)
        model = MLP(1, 1, (100, 100))
        optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=LBFGS_ITERATIONS_PER_EPOCH,
                                      history_size=50, tolerance_grad=1e-12, tolerance_change=1e-15,
                                      line_search_fn="strong_wolfe")
        x = torch.rand(rows, 1)
        y = x ** 2 + x

        def closure():
            optimizer.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss

        start = time.perf_counter()
        optimizer.step(closure)
        best = min(best, time.perf_counter() - start)
    return best * 1e6, rows * sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps per cell: checks the script runs")
    args = p.parse_args()
    from nnfit.train import ONE_THREAD_MAX_WORK, ONE_THREAD_MAX_WORK_LBFGS

    print(f"bench/threads.py: {machine()}; {load_report()}", flush=True)
    steps = 10 if args.quick else 300
    rows = []
    for members, batch in CASES[:2] if args.quick else CASES:
        one, work = step_microseconds(members, batch, 1, steps)
        two, _ = step_microseconds(members, batch, 2, steps)
        rows.append([members, batch, f"{work:.1e}", f"{one:.0f} µs", f"{two:.0f} µs", f"{two / one:.2f}",
                     "1" if work <= ONE_THREAD_MAX_WORK else "free cores"])
    one, work = lbfgs_epoch_microseconds(900, 1, 2 if args.quick else 5)
    two, _ = lbfgs_epoch_microseconds(900, 2, 2 if args.quick else 5)
    rows.append(["1 (L-BFGS epoch)", 900, f"{work:.1e}", f"{one:.0f} µs", f"{two:.0f} µs", f"{two / one:.2f}",
                 "1" if work <= ONE_THREAD_MAX_WORK_LBFGS else "free cores"])
    print(table(["members", "batch", "rows x parameters", "1 thread", "2 threads", "2 / 1", "nnfit's default"],
                rows, "one Adam step of 1 -> 100 -> 100 -> 1 tanh (K stacked members), best of 3; "
                "the last row: one L-BFGS epoch, best of 5"))
    print(f"\nload after the run: {load_report()}")


if __name__ == "__main__":
    main()
