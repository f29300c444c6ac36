"""Training throughput of one network in nnfit, a bare slicing loop, a DataLoader loop, Lightning and skorch.

    python bench/throughput.py              # batches 64, 1024 and 8192, about 3 s per tool and batch
    python bench/throughput.py --quick      # 0.5 s per tool and batch: a smoke run
    python bench/throughput.py --threads 1  # torch.set_num_threads(1) in every worker

Each tool runs in its own process. The network is 1 -> 100 -> 100 -> 1 with tanh (--activation),
trained with Adam on 16,384 samples of y = x**2 + x; the first epoch is a warm-up and is not timed.
A training step costs about 6 flops per weight and sample (forward 2, backward 4), so achieved GFLOP/s is
6 x weights x samples/s; it is compared with a large fp32 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, load_report, machine, run_worker, table  # noqa: E402

N = 16_384
BATCHES = (64, 1024, 8192)
TOOLS = ("nnfit", "slicing", "dataloader", "lightning", "skorch")
LABELS = {"nnfit": "nnfit (adam, default schedule)", "slicing": "bare slicing loop",
          "dataloader": "Dataset + DataLoader loop", "lightning": "Lightning", "skorch": "skorch"}


def _data(n=N):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=g)
    y = x ** 2 + x
    return (x - x.mean()) / x.std(), (y - y.mean()) / y.std()


def _net(activation):
    import torch
    from torch import nn

    torch.manual_seed(0)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}[activation]
    return nn.Sequential(nn.Linear(1, 100), act(), nn.Linear(100, 100), act(), nn.Linear(100, 1))


def weights(activation="tanh") -> int:
    return sum(m.weight.numel() for m in _net(activation) if hasattr(m, "weight"))


def _timed_epochs(run_epoch, seconds):
    """Warm up with one epoch, then run whole epochs until ``seconds`` have passed; samples/s."""
    run_epoch()
    start, samples = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        samples += run_epoch()
    return samples / (time.perf_counter() - start)


def rate_nnfit(batch, seconds, activation="tanh", **settings):
    """nnfit.fit with a fixed batch size; train_seconds from its own summary, epoch overheads included."""
    import nnfit

    x, y = _data()
    frame = {"x": x[:, 0].numpy(), "y": y[:, 0].numpy()}
    import pandas as pd

    frame = pd.DataFrame(frame)
    common = dict(data=frame, target="y", optimizer="adam", batch_size=batch, val_split=0.0, patience=10 ** 6,
                  hidden=(100, 100), activation=activation, quiet=True, plots=False, **settings)
    warm = nnfit.fit(epochs=1, **common)
    per_epoch = warm.summary["train_seconds"]
    epochs = max(2, round(seconds / max(per_epoch, 1e-4)))
    fitted = nnfit.fit(epochs=epochs, **common)
    return N * epochs / fitted.summary["train_seconds"]


def rate_slicing(batch, seconds, activation="tanh", optimizer_kw=None):
    """What a careful hand-written loop does: one permutation per epoch, contiguous slices."""
    import torch
    import torch.nn.functional as F

    X, Y = _data()
    net = _net(activation)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, **(optimizer_kw or {}))

    def epoch():
        perm = torch.randperm(N)
        Xp, Yp = X[perm], Y[perm]
        for i in range(0, N, batch):
            loss = F.mse_loss(net(Xp[i:i + batch]), Yp[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return N

    return _timed_epochs(epoch, seconds)


def rate_dataloader(batch, seconds, activation="tanh"):
    """The tutorial's way: a per-sample Dataset and a shuffling DataLoader."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    X, Y = _data()

    class Samples(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return X[i], Y[i]

    net = _net(activation)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = DataLoader(Samples(), batch_size=batch, shuffle=True)

    def epoch():
        for xb, yb in loader:
            loss = F.mse_loss(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return N

    return _timed_epochs(epoch, min(seconds, 30))


def rate_lightning(batch, seconds, activation="tanh"):
    import warnings

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")
    X, Y = _data()

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net(activation)

        def training_step(self, b, i):
            return F.mse_loss(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    marks = []

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            marks.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module):
            marks.append(time.perf_counter())
            if marks[-1] - marks[2 if len(marks) > 2 else 0] >= seconds and len(marks) >= 4:
                trainer.should_stop = True

    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()])
    trainer.fit(Module(), DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True))
    timed = marks[2:]  # epoch 0 is the warm-up
    return N * (len(timed) // 2) / (timed[-1] - timed[0])


def rate_skorch(batch, seconds, activation="tanh"):
    import torch
    from skorch import NeuralNetRegressor

    X, Y = _data()
    net = NeuralNetRegressor(_net(activation), optimizer=torch.optim.Adam, lr=1e-3, batch_size=batch,
                             max_epochs=1, train_split=None, verbose=0)
    net.initialize()
    net.partial_fit(X, Y)  # warm-up
    start, samples = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        net.partial_fit(X, Y)
        samples += N
    return samples / (time.perf_counter() - start)


def matmul_gflops(n=2048, repeats=10):
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


RATES = {"nnfit": rate_nnfit, "slicing": rate_slicing, "dataloader": rate_dataloader,
         "lightning": rate_lightning, "skorch": rate_skorch}


def worker(tool, batches, seconds, threads, activation):
    import torch

    if threads:
        torch.set_num_threads(threads)
    rates = {str(b): RATES[tool](b, seconds, activation) for b in batches}
    emit({"tool": tool, "rates": rates, "machine": machine(),
          "matmul_gflops": matmul_gflops() if tool == "slicing" else None})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per tool and batch (default 3)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from: {', '.join(TOOLS)}")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0: torch's default)")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu", "silu"))
    p.add_argument("--quick", action="store_true", help="0.5 s per tool and batch: a smoke run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    seconds = 0.5 if args.quick and args.seconds == 3.0 else args.seconds
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        return worker(args.worker, batches, seconds, args.threads, args.activation)
    tools = args.tools.split(",")
    print(f"bench/throughput.py: 1->100->100->1 {args.activation}, {N} samples, Adam; {seconds:g} s per tool and "
          f"batch; {load_report()}", flush=True)
    runs = {}
    for tool in tools:
        runs[tool] = run_worker(__file__, ["--worker", tool, "--batches", args.batches, "--seconds", str(seconds),
                                           "--threads", str(args.threads), "--activation", args.activation],
                                timeout=len(batches) * (seconds * 4 + 40) + 120)
        print(f"  {tool}: {runs[tool].get('error', 'done')}", flush=True)
    ok = [t for t in tools if "error" not in runs[t]]
    if ok:
        print(f"machine: {runs[ok[0]]['machine']}")
    rows = []
    for b in batches:
        rate = {t: runs[t]["rates"][str(b)] for t in ok}
        row = [b, *[f"{rate[t]:,.0f}" if t in rate else "n/a" for t in tools]]
        for peer in ("slicing", "lightning", "skorch"):
            row.append(f"{rate['nnfit'] / rate[peer]:.2f}x" if "nnfit" in rate and peer in rate else "n/a")
        rows.append(row)
    print(table(["batch", *[LABELS[t] for t in tools], "nnfit / slicing", "nnfit / Lightning", "nnfit / skorch"],
                rows, "training samples per second"))
    mm = runs.get("slicing", {}).get("matmul_gflops")
    if "nnfit" in ok and mm:
        flops = 6 * weights(args.activation)
        rows = [[b, f"{runs['nnfit']['rates'][str(b)] * flops / 1e9:.1f}", f"{mm:.0f}",
                 f"{runs['nnfit']['rates'][str(b)] * flops / 1e9 / mm:.0%}"] for b in batches]
        print(table(["batch", "nnfit GFLOP/s", "2048² fp32 matmul GFLOP/s", "fraction"], rows,
                    f"achieved GFLOP/s ({flops:,} flops per sample and step)"))
    print(f"\nload after the run: {load_report()}")


if __name__ == "__main__":
    main()
