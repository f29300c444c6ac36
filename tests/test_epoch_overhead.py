"""Per-epoch work outside the training step: a bounded number of tensor operations, whatever the number of
tensors (bench/epoch_overhead.py counts them; on a GPU each is a kernel launch). And the rollback point that
every epoch's end overwrites in place holds copies, never the live tensors. No timing is asserted."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnfit import freeze, train as train_module
from nnfit.config import Config
from nnfit.model import build_mlp
from nnfit.progress import Reporter
from nnfit.train import TrainData, train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("epoch_overhead", ROOT / "bench" / "epoch_overhead.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SHALLOW, DEEP = (8, 8), (8, 8, 8, 8, 8, 8)  # 6 and 14 tensors
# At most per epoch: the best weights, one foreach copy (on the CPU every tensor is fp32: one group); the
# rollback point, one foreach copy and two RNG states (Python's and numpy's) made into tensors.
COPIES = {"best": 1, "snapshot": 3}


def _counts(members, validation, hidden, epochs=5, **kw):
    return bench.measure(members, validation, rows=80 if validation else 64, batch=16, epochs=epochs, hidden=hidden,
                         **kw)


@pytest.mark.parametrize("members", [1, 3])
def test_the_epoch_outside_the_step_costs_the_same_operations_for_a_deeper_network(members):
    shallow, deep = _counts(members, False, SHALLOW), _counts(members, False, DEEP)
    assert (shallow["tensors"], deep["tensors"]) == (6, 14)
    assert shallow["improved"] and deep["improved"]  # the best copy ran in the measured epochs
    # Without validation nothing outside the step runs the network: per-tensor work would show as a difference.
    assert bench.outside_step(deep) == bench.outside_step(shallow)
    for part, most in COPIES.items():
        assert max(deep["per_epoch"][part]) <= most, (part, deep["per_epoch"][part])
    assert deep["names"]["snapshot", "_foreach_copy_"] == deep["epochs"]
    # Shuffle (one randperm per member, stacked), gather, the loop's slices and sums (3 per step), the
    # epoch's one read of the losses, the copies: a handful per epoch besides the per-step ones.
    assert max(bench.outside_step(deep)) <= 3 * deep["steps"] + members + 12
    assert max(deep["syncs"]) == 1  # the epoch's one host read


def test_with_validation_only_the_evaluation_grows_with_depth_and_members_keep_their_own_best():
    # Noisy targets and a high rate: the members' validation losses wander, so some epochs improve only some members.
    noisy = dict(epochs=8, noise=0.3, lr=0.05, schedule="none")
    shallow, deep = _counts(4, True, SHALLOW, **noisy), _counts(4, True, DEEP, **noisy)
    result = deep["result"]
    assert len(set(result.member_best_epochs)) > 1  # members were kept from different epochs
    for part in [c for c in bench.COLUMNS if c != "evaluate"]:
        assert deep["per_epoch"][part] == shallow["per_epoch"][part] or part == "best", part
    for part, most in COPIES.items():
        assert max(deep["per_epoch"][part]) <= most, (part, deep["per_epoch"][part])


def test_the_rollback_point_holds_copies_of_the_best_start_and_live_weights(monkeypatch):
    """The point is overwritten each epoch and copies best and start weights only when they changed: at the
    last epoch's end it must hold what train restores (the best weights), the starting weights, and the
    final weights and optimizer state, in tensors that share no memory with the live ones."""
    points = []
    monkeypatch.setattr(train_module.Rollback, "good", lambda self, state: (points.append(state),
                                                                             setattr(self, "last_good", state)))
    torch.manual_seed(0)
    x = torch.rand(120, 1)
    y = torch.sin(4 * x) + 0.3 * torch.randn_like(x)
    data = TrainData(x[:80], y[:80], x[80:], y[80:])
    config = Config(optimizer="adam", lr=0.05, batch_size=16, epochs=8, patience=100, schedule="none", ensemble=3,
                    hidden=(8, 8), seed=0)
    model = build_mlp(1, 1, config)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    final = {}
    finish = train_module.Run.finish
    monkeypatch.setattr(train_module.Run, "finish", lambda run, *a: (final.update(
        model={k: v.clone() for k, v in run.model.state_dict().items()},
        optimizer=[t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]),
        finish(run, *a)))
    result = train(model, data, config, Reporter(quiet=True))
    assert len(points) == 8
    kept = [k for k in points[0].tensors if not k.startswith("rng/")]  # RNG states: new tensors, made by torch
    assert all(p.tensors[k] is points[0].tensors[k] for p in points for k in kept)  # the same buffers each epoch
    assert len(set(result.member_best_epochs)) > 1
    point = points[-1].tensors
    for name, value in model.state_dict().items():  # train restored the best weights
        assert torch.equal(point[f"best/{name}"], value)
        assert torch.equal(point[f"start/{name}"], start[name])
        assert torch.equal(point[f"model/{name}"], final["model"][name])
    history = points[-1].info["history"]  # copied a row at a time as epochs end, not all again each epoch
    assert history == result.history and not any(a is b for a, b in zip(history, result.history))
    assert all(a is b for a, b in zip(points[-2].info["history"], history))
    live = [*freeze.unwrap(model).state_dict(keep_vars=True).values(), *final["optimizer"]]
    live_memory = {t.untyped_storage().data_ptr() for t in live}
    assert not live_memory & {t.untyped_storage().data_ptr() for t in point.values()}


def test_the_bench_prints_its_table():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "epoch_overhead.py"), "--quick", "--epochs", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith("| ")]
    header, rows = table[0], table[1:]
    assert [(r[0], r[1]) for r in rows] == [("1", "off"), ("1", "on"), ("8", "off"), ("8", "on")]
    assert all(int(r[header.index("snapshot")]) <= COPIES["snapshot"] for r in rows)
