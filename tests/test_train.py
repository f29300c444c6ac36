"""The training loop's pieces: the learning rate as a pure function of the step."""

import math
import warnings

import pytest
import torch

from nnfit.train import Recipe, Schedule


@pytest.mark.parametrize("total", [5, 37, 500])
def test_one_cycle_matches_torchs_one_cycle_lr_and_momentum(total):
    p = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.Adam(p, lr=1e-3)
    torchs = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[1e-3], total_steps=total,
                                                 pct_start=min(0.5, max(0.1, 2.5 / total)), div_factor=10,
                                                 final_div_factor=100)
    ours = Schedule.of(Recipe("adam", 1e-3, 8, total, "onecycle", 1), 1)
    for step in range(total):
        assert ours.lr_at(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
        assert ours.momentum_at(step) == pytest.approx(optimizer.param_groups[0]["betas"][0], rel=1e-12), step
        optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if step < total - 1:
                torchs.step()


def test_cosine_matches_torchs_closed_form_and_apply_writes_each_group():
    ours = Schedule("cosine", 0.1, 100)
    for step in (0, 10, 50, 99, 100):
        torchs = 0.1e-3 + (0.1 - 0.1e-3) * (1 + math.cos(math.pi * step / 100)) / 2  # CosineAnnealingLR
        assert ours.lr_at(step) == pytest.approx(torchs, rel=1e-6)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "base_lr": 0.1}, {"params": [b], "base_lr": 1.0,
                                                                     "lr": torch.tensor(0.0)}], lr=0.1)
    ours.factor = 0.5  # one rollback
    ours.apply(optimizer, 50)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * ours.lr_at(50, 0.1) / 0.5)
    tensor_lr = optimizer.param_groups[1]["lr"]
    assert isinstance(tensor_lr, torch.Tensor)  # a captured graph's rate is filled in place
    assert tensor_lr.item() == pytest.approx(ours.lr_at(50, 1.0))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_optimizer_is_fused_so_mixed_precision_reads_nothing_back(name, monkeypatch):
    """A fused optimizer takes GradScaler's found-inf flag as a tensor; a foreach one makes GradScaler read
    it back to the host (``_maybe_opt_step``'s ``.item()``) at every step of --precision 16-mixed."""
    from types import SimpleNamespace
    from nnfit.train import make_optimizer
    config = SimpleNamespace(momentum=0.9, weight_decay=1e-4)
    model = torch.nn.Linear(3, 1)
    optimizer = make_optimizer(model.parameters(), Recipe(name, 1e-2, 8, 1, "none", None), config)
    assert optimizer.defaults["fused"] and optimizer._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    monkeypatch.setattr(scaler, "_maybe_opt_step", lambda *a, **k: pytest.fail("found-inf read back to the host"))
    before = model.weight.detach().clone()
    scaler.scale(model(torch.randn(8, 3)).pow(2).mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(model.weight, before)


def test_a_device_without_fused_kernels_gets_the_foreach_optimizer(monkeypatch):
    from types import SimpleNamespace
    from nnfit import train
    monkeypatch.setattr(train, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    config = SimpleNamespace(momentum=0.9, weight_decay=0.0)
    for name in ("sgd", "adam"):
        optimizer = train.make_optimizer(torch.nn.Linear(3, 1).parameters(), Recipe(name, 1e-2, 8, 1, "none", None),
                                         config)
        assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]


def test_an_out_of_memory_capture_of_the_lbfgs_closure_is_not_retried_every_epoch(monkeypatch):
    """After the closure's capture runs out of memory the run keeps the eager closure, and says so once."""
    from types import SimpleNamespace
    from nnfit import graphed, train
    captures, notes = [], []

    class OutOfMemory:
        def __init__(self, *args, **kwargs):
            pass

        def capture(self, zero_grad):
            captures.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(graphed, "GraphedClosure", OutOfMemory)
    model = torch.nn.Linear(2, 1)
    run = object.__new__(train.Run)
    run.plan = SimpleNamespace(device=torch.device("cuda"), plain=True, note=notes.append)
    run.config = SimpleNamespace(cuda_graph="auto", grad_clip=None)
    run.net, run._closure, run._no_closure_graph = model, None, False
    run.optimizer = torch.optim.LBFGS(model.parameters())
    X, Y = torch.randn(4, 2), torch.randn(4, 1)
    assert [run._lbfgs_graph(X, Y) for _ in range(3)] == [None] * 3
    assert len(captures) == 1 and len(notes) == 1 and "out of memory" in notes[0]
