"""Per-epoch work outside the training step, counted in tensor operations and host reads.

    python bench/epoch_overhead.py           # the GPU issue's case: 1M rows, batch 65536 (about 2 minutes on 2 CPU cores)
    python bench/epoch_overhead.py --quick   # 16 batches of 64 rows: the same counts in seconds

On a GPU every small tensor operation is a kernel launch of several microseconds, and every host read
(``.item()``, ``.tolist()``, ``float(tensor)``) waits for the GPU; at batch 65536 an epoch is only 16
steps, so what an epoch does around its steps shows in the throughput (the GPU issue measured nnfit at
0.77x a graphed reference loop there). The number of operations does not depend on the machine's load
or on the device, so it is counted here on the CPU: every aten operation dispatched while ``train``
runs (``TorchDispatchMode``), attributed to the part of the loop that issued it (the permutation, the
epoch's gather, the loop around the steps, the evaluation, the best-weights copy, the rollback
snapshot, the checkpoint saver, the reporter), leaving out what the steps themselves dispatch.

The tutorial network 1 -> 100 -> 100 -> 1 tanh with Adam, as one network (K = 1) and as an ensemble
(K = 8), with and without validation rows. Counts are per epoch, over the epochs after the first; the
table says in how many of them the best weights improved (the best copy runs only then).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Where in the loop an operation comes from: (owner, attribute) -> label. Each is wrapped while counting.
PARTS = [("_permutation", "shuffle"), ("_epoch_rows", "gather"), ("Run.epoch", "loop"),
         ("_measure", "evaluate"), ("Run.keep_best", "best"), ("Run.snapshot", "snapshot"),
         ("Run.keep_point", "snapshot"), ("Saver.epoch_end", "save"), ("Reporter.epoch", "report"),
         ("Run.finish", "finish"), ("EagerStep.__call__", "step")]
COLUMNS = ["shuffle", "gather", "loop", "evaluate", "best", "snapshot", "save", "report", "other"]
SYNCS = {"_local_scalar_dense"}  # .item(), float(t), bool(t) all end here; .tolist() is counted by a wrapper


class Counter(TorchDispatchMode):
    """Counts dispatched aten operations and host reads per (epoch, label)."""

    def __init__(self):
        super().__init__()
        self.epoch, self.labels = 0, ["other"]
        self.ops = collections.Counter()
        self.syncs = collections.Counter()
        self.improved: dict[int, bool] = {}  # epoch -> the best weights were copied
        self.names = collections.Counter()  # (label, op name) outside the step from epoch 2 on, for --ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        label = self.labels[-1]
        self.ops[self.epoch, label] += 1
        name = func.overloadpacket.__name__
        if label != "step" and self.epoch >= 2:
            self.names[label, name] += 1
        if name in SYNCS:
            self.syncs[self.epoch, label] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting():
    """A ``Counter`` active while the block trains; the loop's parts wrapped to label their operations."""
    from nnfit import progress, train, trainstate

    counter = Counter()
    owners = {"Run": train.Run, "EagerStep": train.EagerStep, "Saver": trainstate.Saver,
              "Reporter": progress.Reporter}
    patched = []

    def wrap(fn, label):
        def labelled(*args, **kwargs):
            if label == "shuffle":  # each epoch draws its permutation first
                counter.epoch += 1
            counter.labels.append(label)
            try:
                out = fn(*args, **kwargs)
            finally:
                counter.labels.pop()
            if label == "best":  # keep_best says whether any member improved
                counter.improved[counter.epoch] = out
            return out
        return labelled

    for where, label in PARTS:
        owner_name, _, attr = where.rpartition(".")
        owner = owners[owner_name] if owner_name else train
        patched.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrap(getattr(owner, attr), label))
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.syncs[counter.epoch, counter.labels[-1]] += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


def measure(members: int, validation: bool, rows: int, batch: int, epochs: int, hidden=(100, 100),
            noise: float = 0.0, **settings) -> dict:
    """Train a network (the tutorial's by default) on y = x**2 + x (plus ``noise``) for ``epochs`` epochs
    under a ``Counter``; ``rows`` in all, a tenth of them for validation when ``validation``. Per-epoch
    counts outside the step over epochs 2..epochs (the first epoch allocates what later ones reuse).
    ``settings``: other ``Config`` fields (lr, schedule, ...)."""
    from nnfit.config import Config
    from nnfit.model import build_mlp
    from nnfit.progress import Reporter
    from nnfit.train import TrainData, train

    torch.manual_seed(0)
    x = torch.rand(rows, 1)
    y = x ** 2 + x + noise * torch.randn(rows, 1)
    n_val = rows // 10 if validation else 0
    data = TrainData(x[n_val:], y[n_val:], x[:n_val], y[:n_val])
    config = Config(**{"optimizer": "adam", "batch_size": batch, "epochs": epochs, "patience": 10 ** 6,
                       "val_split": 0.1 if validation else 0.0, "threads": 1, "hidden": tuple(hidden),
                       "ensemble": members, "seed": 0, **settings})
    model = build_mlp(1, 1, config)
    with counting() as counter:
        result = train(model, data, config, Reporter(quiet=True))
    measured = range(2, len(result.history) + 1)
    per_epoch = {label: [counter.ops[e, label] for e in measured] for label in [*COLUMNS, "step"]}
    improved = sum(1 for e in measured if counter.improved.get(e))
    return {"members": members, "validation": validation, "steps": math.ceil(len(data.X_train) / batch),
            "epochs": len(measured), "improved": improved, "per_epoch": per_epoch,
            "syncs": [sum(counter.syncs[e, label] for label in COLUMNS) for e in measured],
            "tensors": len(model.state_dict()), "names": counter.names, "result": result}


def outside_step(measured: dict) -> list[int]:
    """Operations outside the step in each measured epoch."""
    return [sum(measured["per_epoch"][label][i] for label in COLUMNS) for i in range(measured["epochs"])]


def _spread(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def main() -> None:
    from _common import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 batches of 64 rows (the same counts, in seconds)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ops", action="store_true", help="also list the operations by name")
    args = parser.parse_args()
    batch = 64 if args.quick else 65536
    rows = 16 * batch  # 16 steps per epoch, as 1,048,576 rows at batch 65536
    results = [measure(k, v, rows + (rows // 9 if v else 0), batch, args.epochs) for k in (1, 8) for v in (False, True)]
    print(f"Tutorial network 1-100-100-1 tanh, Adam, batch {batch}, {rows:,} training rows (16 steps per epoch), "
          f"CPU; per epoch, epochs 2-{args.epochs}\n")
    head = ["K", "validation", "tensors", *COLUMNS, "outside the step", "host reads", "in the step", "improved"]
    body = []
    for r in results:
        p = r["per_epoch"]
        body.append([r["members"], "on" if r["validation"] else "off", r["tensors"],
                     *[_spread(p[c]) for c in COLUMNS], _spread(outside_step(r)), _spread(r["syncs"]),
                     _spread(p["step"]), f"{r['improved']} of {r['epochs']}"])
    print(table(head, body))
    if args.ops:
        for r in results:
            print(f"\nK={r['members']} validation {'on' if r['validation'] else 'off'}, operations outside the "
                  f"step over {r['epochs']} epochs:")
            for (label, name), n in sorted(r["names"].items()):
                if label not in ("step", "finish"):
                    print(f"  {label:9} {name:28} {n}")


if __name__ == "__main__":
    main()
