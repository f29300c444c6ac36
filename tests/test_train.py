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
