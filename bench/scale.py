"""Data-parallel scaling on the CPU: training throughput of 1 process against 2 DDP processes (gloo).

    python bench/scale.py            # 4 -> 512x512x512 -> 1, 200k samples: a few minutes on 2 cores
    python bench/scale.py --quick    # 20k samples: a smoke run, not a measurement

The network is large enough for DDP to pay off. Throughput is training samples per second over the
epochs after the first (the first one warms up), from each run's own per-epoch timings. The two
workers split the machine's cores, so the fair baseline for the scaling efficiency is one process
with one worker's share of the cores: efficiency = rate(2 processes) / (2 x rate(1 process, same
threads)). One process with every core is listed too. On a CUDA machine, scripts/gpu_check.sh
records the single-GPU figures.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine, table  # noqa: E402


def rate(history, rows: int) -> float:
    timed = history[1:] or history
    return rows * len(timed) / sum(h["seconds"] for h in timed)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20k samples, 2 epochs: checks the script runs")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cuda: single-GPU figures (fp32 and bf16) instead of CPU scaling")
    args = p.parse_args()
    samples = args.samples or (20_000 if args.quick else 200_000)
    epochs = args.epochs or (2 if args.quick else 3)

    import torch

    import nnfit

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, cores // 2)
    settings = dict(formula="sin(a)*cos(b) + c*d", domain={"a": (0, 3), "b": (0, 3), "c": (-1, 1), "d": (-1, 1)},
                    samples=samples, val_split=0.05, test_samples=1000, hidden=(512, 512, 512), activation="tanh",
                    optimizer="adam", schedule="none", batch_size=4096, epochs=epochs, patience=epochs,
                    device=args.device, quiet=True, plots=False)
    rows = int(samples * 0.95)
    print(f"bench/scale.py: {machine()}", flush=True)
    params = 4 * 512 + 2 * 512 * 512 + 512 + 3 * 512 + 1
    print(f"4 -> 512x512x512 -> 1 ({params:,} parameters), {rows:,} training rows, Adam, global batch 4096, "
          f"{epochs} epochs", flush=True)

    if args.device != "cpu":
        body = []
        for precision in ("32", "bf16"):
            fitted = nnfit.fit(**settings, precision=precision)
            body.append([f"1 process on {fitted.summary['device']}, precision {precision}",
                         f"{rate(fitted.history, rows):,.0f}", fitted.summary["peak_memory"]["human"],
                         f"{fitted.history[-1]['train_loss']:.3e}"])
        print(table(["run", "samples/s", "peak memory", "last train loss"], body))
        return

    results = []
    for label, procs, threads in ((f"1 process, {cores} threads", 1, cores),
                                  (f"1 process, {share} thread(s)", 1, share),
                                  (f"2 processes (DDP, gloo), {share} thread(s) each", 2, share)):
        if procs == 1:
            fitted = nnfit.fit(**settings, threads=threads)
        else:
            fitted = nnfit.fit(**settings, devices=2)
        results.append((label, procs, rate(fitted.history, rows), fitted.history[-1]["train_loss"]))
        print(f"  {label}: {results[-1][2]:,.0f} samples/s", flush=True)
    torch.set_num_threads(cores)

    base = results[1][2]
    body = []
    for label, procs, r, loss in results:
        speedup = r / base
        body.append([label, f"{r:,.0f}", f"{speedup:.2f}x", f"{speedup / procs:.0%}" if label != results[0][0] else "-",
                     f"{loss:.3e}"])
    print(table(["run", "samples/s", "vs 1 process (same threads)", "scaling efficiency", "last train loss"], body))


if __name__ == "__main__":  # --devices workers are spawned: they import this file again
    main()
