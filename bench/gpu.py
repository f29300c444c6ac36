"""The GPU issue's table in one run: training throughput of nnfit against a bare PyTorch loop, the same
step captured by hand as one CUDA graph, and Lightning; a larger network in fp32 and bf16; an ensemble
of 8 tutorial networks against one (the ensembles issue's GPU target: <= 1.3x one member's time at batch
1024); and the time the tutorial exercise takes to reach a test MSE of 1e-7 on the GPU and on the CPU.

    python bench/gpu.py                      # on a CUDA machine: about 2 minutes, prints markdown
    python bench/gpu.py --quick --device cpu # a smoke run of every code path on the CPU (not a measurement)

Throughput is training samples per second with the data resident on the device (1M samples of
x**2 + x, standardized; the tutorial network 1 -> 100 -> 100 -> 1 tanh, Adam). nnfit's figure is its
own ``train_seconds`` (warm-up and capture included, set-up and evaluation after training excluded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import fmt_s, keeping_lines, machine, table  # noqa: E402


def _net(widths):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_loop(X, Y, bs, widths, seconds, dev, amp=None):
    """The loop a user writes: an on-device permutation, slices, a fused Adam."""
    import torch
    import torch.nn.functional as F

    m = _net(widths).to(dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=True)
    n = len(X)

    def epoch():
        perm = torch.randperm(n, device=dev)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                out = m(X[idx])
            loss = F.mse_loss(out.float(), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return n
    return _rate(epoch, seconds, dev)


def graphed_loop(X, Y, bs, widths, seconds, dev, amp=None):
    """The reference capture (the issue's): static buffers filled by index_select, forward + MSE +
    backward + Adam(capturable) in one torch.cuda.CUDAGraph, one replay per batch."""
    import torch
    import torch.nn.functional as F

    m = _net(widths).to(dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, capturable=True, foreach=True)
    n = len(X)
    sx, sy = X[:bs].clone(), Y[:bs].clone()

    def body():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None, cache_enabled=False):
            out = m(sx)
        loss = F.mse_loss(out.float(), sy)
        loss.backward()
        opt.step()
        return loss

    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(dev).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        body()

    def epoch():
        perm = torch.randperm(n, device=dev)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i:i + bs]
            torch.index_select(X, 0, idx, out=sx)
            torch.index_select(Y, 0, idx, out=sy)
            graph.replay()
        return (n // bs) * bs
    return _rate(epoch, seconds, dev)


def _rate(epoch, seconds, dev):
    epoch()
    _sync(dev)
    start, rows = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        rows += epoch()
    _sync(dev)
    return rows / (time.perf_counter() - start)


def nnfit_rate(X, Y, bs, hidden, seconds, dev, precision="32", log=None, ensemble=1):
    """nnfit.fit on the same data (a DataFrame, so the API's own loading and placement), fixed epochs.
    With ``ensemble`` K > 1: K stacked members, each seeing every sample once per epoch (the rate counts
    samples per member, so K members at one member's rate take one member's time)."""
    import pandas as pd

    import nnfit

    cols = {f"x{i}": X[:, i].cpu().numpy() for i in range(X.shape[1])}
    frame = pd.DataFrame({**cols, "y": Y[:, 0].cpu().numpy()})
    common = dict(data=frame, target="y", optimizer="adam", batch_size=bs, val_split=0.0, patience=10 ** 6,
                  hidden=tuple(hidden), activation="tanh", quiet=True, plots=False, device=str(dev),
                  precision=precision, ensemble=ensemble)
    warm = nnfit.fit(epochs=1, **common)
    epochs = max(2, round(seconds / max(warm.summary["train_seconds"], 1e-4)))
    lines = []
    fitted = nnfit.fit(epochs=epochs, reporter=keeping_lines(lines), **common)
    if log is not None:
        log.extend(line for line in lines if "graph" in line or "eager" in line)
    return len(X) * epochs / fitted.summary["train_seconds"]


def lightning_rate(X, Y, bs, widths, batches, dev, warm=10):
    """Lightning with its usual TensorDataset + DataLoader: its steady state, ``batches`` steps timed after
    ``warm`` untimed ones in the same fit (a callback starts the clock at the first timed batch and stops it
    after the last, the GPU synchronized at both), so the Trainer's set-up and teardown are not counted."""
    import warnings

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.m = _net(widths)

        def training_step(self, b, i):
            return F.mse_loss(self.m(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Clock(L.Callback):
        start = stop = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warm:
                _sync(dev)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warm + batches - 1:
                _sync(dev)
                self.stop = time.perf_counter()

    loader = DataLoader(TensorDataset(X.cpu(), Y.cpu()), batch_size=bs, shuffle=True)
    if len(loader) < warm + batches:
        raise ValueError(f"{len(loader)} batches per epoch, fewer than {warm} + {batches}")
    clock = Clock()
    L.Trainer(max_epochs=1, limit_train_batches=warm + batches, accelerator="gpu" if dev.type == "cuda" else "cpu",
              devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[clock]).fit(M(), loader)
    return batches * bs / (clock.stop - clock.start)


def tutorial_time(device, target=1e-7):
    """The tutorial exercise (bench/_common.py's "tutorial" case: 1000 samples of x**2 + x, nnfit's default
    recipe, as in ``nnfit demo``): the training time at which the test MSE first reached ``target`` (tested
    after each epoch with the clock paused), the whole training, and fit()'s wall time."""
    import numpy as np
    import pandas as pd
    import torch

    import nnfit
    from _common import case_data
    from nnfit.data import Scaling, split_indices
    from nnfit.model import MLP
    from nnfit.progress import Reporter

    Xtr, ytr, Xte, yte = case_data("tutorial")
    frame = pd.DataFrame({"x": Xtr[:, 0], "y": ytr[:, 0]})
    config = nnfit.Config(data=None, target=("y",), device=device, quiet=True, plots=False)
    # The same split and scaling fit() computes, so that the watcher can test in original units.
    train_idx, _ = split_indices(len(Xtr), config.val_split, config.seed)
    scaling = Scaling.fit(torch.from_numpy(Xtr[train_idx.numpy()]), torch.from_numpy(ytr[train_idx.numpy()]))
    torch.manual_seed(config.seed)
    module = MLP(1, 1, config.hidden, config.activation)
    Xte_s = scaling.scale_x(torch.from_numpy(Xte)).float()
    clock = {"spent": 0.0, "since": 0.0, "reached": None}

    class Watch(Reporter):
        def start(self, recipe, n_train, n_val):
            super().start(recipe, n_train, n_val)
            clock["since"] = time.perf_counter()

        def epoch(self, row, improved):
            clock["spent"] += time.perf_counter() - clock["since"]
            if clock["reached"] is None:
                p = next(module.parameters())
                with torch.inference_mode():
                    pred = scaling.unscale_y(module(Xte_s.to(p.device)).double().cpu()).numpy()
                if float(np.mean((pred.reshape(yte.shape) - yte) ** 2)) <= target:
                    clock["reached"] = clock["spent"]
            clock["since"] = time.perf_counter()

    started = time.perf_counter()
    # A factory, not the instance: fit trains a copy of an instance, and Watch must see the trained module.
    fitted = nnfit.fit(data=frame, target="y", model=lambda: module, config=config, reporter=Watch(quiet=True))
    wall = time.perf_counter() - started
    final = float(np.mean((np.asarray(fitted.predict(Xte)).reshape(yte.shape) - yte) ** 2))
    return {"wall": wall, "train": fitted.summary["train_seconds"], "reached": clock["reached"],
            "test_mse": final, "device": fitted.summary["device"], "recipe": fitted.summary["recipe"]}


def _attempt(fn, notes, what):
    """A measurement that may fail (a missing package, a bug): its value, or None and a note."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the table goes on; the note says what failed
        notes.append(f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return None


def progress(line: str) -> None:
    """A progress line, on stderr: stdout holds only the markdown (gpu_check.sh keeps it as gpu_bench.md)."""
    print(line, file=sys.stderr, flush=True)


def _m(rate):
    return f"{rate / 1e6:.2f}M" if rate else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short timings: checks the script runs")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a smoke run)")
    args = p.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/gpu.py: no CUDA GPU here (torch {torch.__version__}); nothing to measure. "
              "Run it on a CUDA machine, or pass --quick --device cpu for a smoke run.")
        return 0
    began = time.perf_counter()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    quick = args.quick
    n = 1 << (14 if quick else 20)
    seconds = 0.2 if quick else 1.5
    batches = (1024, 8192) if quick else (1024, 8192, 65536)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"bench/gpu.py on {name}: {machine()}", flush=True)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, generator=g)
    y = x ** 2 + x
    X, Y = ((x - x.mean()) / x.std()).to(dev), ((y - y.mean()) / y.std()).to(dev)
    W = [1, 100, 100, 1]
    rows, notes = [], []
    light_warm, light_batches = (1, 1) if quick else (10, 40)
    graph = dev.type == "cuda"
    for bs in batches:
        bare = bare_loop(X, Y, bs, W, seconds, dev)
        ref = graphed_loop(X, Y, bs, W, seconds, dev) if graph else None
        log: list = []
        ours = _attempt(lambda: nnfit_rate(X, Y, bs, W[1:-1], seconds, dev, log=log), notes, f"nnfit at batch {bs}")
        notes += [f"batch {bs}: {line}" for line in log[:2]]
        light = None
        if bs == 8192:
            light = _attempt(lambda: lightning_rate(X, Y, bs, W, light_batches, dev, light_warm), notes, "Lightning")
        rows.append([bs, f"{bare / 1e6:.2f}M", f"{ref / 1e6:.2f}M" if ref else "-", _m(ours),
                     f"{ours / ref:.2f}x" if ref and ours else "-", f"{ours / bare:.2f}x" if ours else "-", _m(light)])
        progress(f"  batch {bs}: bare {bare:,.0f}/s, graphed {ref or 0:,.0f}/s, nnfit {ours or 0:,.0f}/s")
    print(table(["batch", "bare slicing loop", "graphed reference", "nnfit", "nnfit / graphed", "nnfit / bare",
                 "Lightning (DataLoader)"], rows,
                f"Tutorial network 1-100-100-1 tanh, Adam, {n:,} samples on {name}: samples per second "
                f"(Lightning: its steady state, {light_batches} batches timed after {light_warm} warm-up ones in "
                "one fit, the Trainer's set-up and teardown not counted)"), flush=True)

    # The larger network: 4 -> 512 x 3 -> 1 at batch 4096.
    n4 = 1 << (12 if quick else 18)
    X4 = torch.rand(n4, 4, generator=g)
    Y4 = torch.sin(X4[:, :1]) * torch.cos(X4[:, 1:2]) + X4[:, 2:3] * X4[:, 3:4]
    X4, Y4 = X4.to(dev), Y4.to(dev)
    W4 = [4, 64, 64, 64, 1] if quick else [4, 512, 512, 512, 1]
    bs4 = 512 if quick else 4096
    big = []
    for precision, amp in (("32", None), ("bf16", torch.bfloat16)):
        bare = bare_loop(X4, Y4, bs4, W4, seconds, dev, amp)
        ref = graphed_loop(X4, Y4, bs4, W4, seconds, dev, amp) if graph else None
        log = []
        ours = _attempt(lambda: nnfit_rate(X4, Y4, bs4, W4[1:-1], seconds, dev, precision, log=log), notes,
                        f"nnfit 4-512x3-1 {precision}")
        notes += [f"4-512x3-1 {precision}: {line}" for line in log[:2]]
        big.append([precision, f"{bare / 1e6:.2f}M", f"{ref / 1e6:.2f}M" if ref else "-", _m(ours),
                    f"{ours / ref:.2f}x" if ref and ours else "-"])
        progress(f"  4-512x3-1 {precision}: bare {bare:,.0f}/s, graphed {ref or 0:,.0f}/s, "
                 f"nnfit {ours or 0:,.0f}/s")
    print(table(["precision", "bare slicing loop", "graphed reference", "nnfit", "nnfit / graphed"], big,
                f"4 -> {'x'.join(str(w) for w in W4[1:-1])} -> 1 tanh, Adam, batch {bs4}, {n4:,} samples on {name}: "
                "samples per second"), flush=True)

    # An ensemble of 8 tutorial networks (--ensemble 8: one stacked, captured step) against one member.
    ens, rates = [], {}
    bs_e = 1024
    for members in (1, 8):
        log = []
        rates[members] = _attempt(lambda: nnfit_rate(X, Y, bs_e, W[1:-1], seconds, dev, log=log, ensemble=members),
                                  notes, f"nnfit --ensemble {members}")
        notes += [f"ensemble {members}: {line}" for line in log[:2]]
        step = "captured" if any("captured as a CUDA graph" in line for line in log) else \
            "eager" if any("not a CUDA graph" in line for line in log) else "-"
        ratio = f"{rates[1] / rates[members]:.2f}x" if rates[1] and rates[members] else "-"
        ens.append([members, _m(rates[members]), ratio, "<= 1.3x" if members == 8 and dev.type == "cuda" else "",
                    step])
        progress(f"  ensemble {members}: nnfit {rates[members] or 0:,.0f} samples/s per member")
    print(table(["members", "nnfit samples/s (per member)", "time / one member's", "target", "step"], ens,
                f"Ensemble: K stacked 1-100-100-1 tanh members, Adam, batch {bs_e}, {n:,} samples on {name}"),
          flush=True)

    # The tutorial exercise, end to end, on this device and on the CPU.
    tut = []
    for device in ([str(dev), "cpu"] if dev.type != "cpu" else ["cpu"]):
        r = _attempt(lambda: tutorial_time(device), notes, f"the tutorial exercise on {device}")
        if r is None:
            continue
        tut.append([r["device"], r["recipe"], fmt_s(r["reached"]), fmt_s(r["train"]), fmt_s(r["wall"]),
                    f"{r['test_mse']:.2e}"])
    print(table(["device", "recipe", "time to test MSE <= 1e-7", "training", "fit() wall time", "final test MSE"],
                tut, "The tutorial exercise (nnfit demo's problem: 1000 samples of x**2 + x on [0, 1])"), flush=True)
    print("\nNotes (the runs' own lines about the captured step, and any failures):")
    for line in notes:
        print(f"- {line}")
    print(f"\nbench/gpu.py took {time.perf_counter() - began:.0f} s")
    if dev.type == "cuda":
        print(f"\nGPU: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; TF32 off for the loops above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
