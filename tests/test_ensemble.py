"""Ensembles (--ensemble K): K stacked MLPs trained by the same loop as one network, each member with
its own initial weights, data order, best epoch and kept weights; predictions are the members' mean and
their standard deviation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nnfit
from nnfit import devices, freeze
from nnfit import train as train_module
from nnfit.cli import main
from nnfit.config import Config
from nnfit.errors import NnfitError
from nnfit.model import MLP, StackedMLP, build_mlp
from nnfit.progress import Reporter
from nnfit.train import TrainData, evaluate_loss, train

SMALL = {"samples": 200, "test_samples": 200, "hidden": (16, 16), "quiet": True, "plots": False}
ADAM = {"optimizer": "adam", "batch_size": 32}


def stacked_weights(run) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(run / "model.safetensors").items()}


def test_each_member_starts_as_the_mlp_of_its_own_seed():
    stacked = build_mlp(1, 1, Config(ensemble=3, hidden=(8, 8), seed=5))
    assert isinstance(stacked, StackedMLP) and stacked.l1.weight.shape == (3, 8, 1)
    for k in range(3):
        torch.manual_seed(5 + k)
        single = MLP(1, 1, (8, 8))
        for name, tensor in single.state_dict().items():
            assert torch.equal(stacked.state_dict()[name][k], tensor), (k, name)
    # Member 0 starts where a single network of the same seed starts.
    first = stacked.member(0)
    torch.manual_seed(5)  # as api.fit seeds before it builds the network
    assert torch.equal(first.l3.weight, build_mlp(1, 1, Config(hidden=(8, 8), seed=5)).l3.weight)


def test_stacked_forward_is_each_members_forward():
    stacked = build_mlp(2, 3, Config(ensemble=4, hidden=(8,)))
    x = torch.randn(5, 2)
    out = stacked(x)
    assert out.shape == (4, 5, 3)
    for k in range(4):
        torch.testing.assert_close(out[k], stacked.member(k)(x))
    per_member = torch.randn(4, 5, 2)  # one batch per member
    torch.testing.assert_close(stacked(per_member)[2], stacked.member(2)(per_member[2]))


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "run"
    model = nnfit.fit(formula="sin(3*x)*exp(-x)", domain={"x": (0, 3)}, ensemble=4, epochs=15, out=str(out),
                      **ADAM, **SMALL)
    return model, out


def test_ensemble_learns_and_predicts_the_members_mean_and_std(ensemble_run):
    model, _ = ensemble_run
    assert model.members == 4 and "ensemble=4" in repr(model)
    X = np.linspace(0, 4, 41)[:, None]
    mean, std = model.predict(X, return_std=True)
    members = model.member_predictions(torch.tensor(X))
    assert members.shape == (4, 41, 1)
    np.testing.assert_allclose(mean, members.mean(0)[:, 0].numpy())
    np.testing.assert_allclose(std, members.std(0)[:, 0].numpy())
    assert np.array_equal(model.predict(X), mean)
    assert (std > 0).all()
    first = model.summary["validation"]["mse"]
    assert first < 0.05  # it learned (the target's variance is ~0.1)
    info = model.summary["ensemble"]
    assert info["members"] == 4 and len(info["best_epochs"]) == len(info["best_val_losses"]) == 4
    assert model.summary["best_epoch"] == max(info["best_epochs"])


def test_ensemble_saves_and_loads_bit_identically(ensemble_run):
    model, out = ensemble_run
    arch = json.loads((out / "model.json").read_text())["architecture"]
    assert arch["members"] == 4 and arch["hidden"] == [16, 16]
    loaded = nnfit.load(out, device=str(model.device))  # the same device: the same kernels, the same numbers
    assert isinstance(loaded.module, StackedMLP) and loaded.members == 4
    for name, tensor in model.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name].cpu(), tensor.cpu()), name
    X = np.linspace(0, 3, 17)[:, None]
    for a, b in zip(model.predict(X, return_std=True), loaded.predict(X, return_std=True)):
        assert np.array_equal(a, b)


def test_each_member_keeps_the_weights_of_its_own_best_epoch():
    torch.manual_seed(0)
    x = torch.rand(300, 1) * 2 - 1
    y = torch.sin(4 * x) + 0.3 * torch.randn_like(x)  # noisy: validation losses wander, best epochs differ
    data = TrainData(x[:200], y[:200], x[200:], y[200:])
    model = build_mlp(1, 1, Config(ensemble=3, hidden=(32, 32)))
    config = Config(optimizer="adam", lr=3e-2, batch_size=16, epochs=12, patience=12, schedule="none")
    result = train(model, data, config, Reporter(quiet=True))
    assert len(result.member_best_epochs) == 3
    measured = evaluate_loss(model, data.X_val, data.Y_val)
    assert measured.shape == (3,)
    np.testing.assert_allclose(measured.tolist(), result.member_best_val_losses, rtol=1e-5)
    assert result.best_epoch == max(result.member_best_epochs)


def test_member_learning_rates_scale_each_members_step_exactly():
    """One full-batch SGD step: member k moves exactly as it would at its own learning rate."""
    torch.manual_seed(0)
    x = torch.rand(64, 1)
    data = TrainData(x, x ** 2, x[:0], x[:0] ** 2)
    config = Config(optimizer="sgd", momentum=0.0, lr=0.1, batch_size=64, epochs=1, schedule="none")

    def stepped(lr, member_lrs=None):
        model = build_mlp(1, 1, Config(ensemble=2, hidden=(8,)))
        train(model, data, config.replace(lr=lr), Reporter(quiet=True), member_lrs=member_lrs)
        return model

    mixed, fast, slow = stepped(0.1, [0.1, 0.4]), stepped(0.4), stepped(0.1)
    for name, tensor in mixed.state_dict().items():
        torch.testing.assert_close(tensor[0], slow.state_dict()[name][0], rtol=0, atol=1e-7)
        torch.testing.assert_close(tensor[1], fast.state_dict()[name][1], rtol=0, atol=1e-7)
    with pytest.raises(NnfitError, match="member_lrs gives 3 learning rate"):
        train(build_mlp(1, 1, Config(ensemble=2, hidden=(8,))), data, config, Reporter(quiet=True),
              member_lrs=[0.1, 0.2, 0.3])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_grad_clip_clips_each_member_as_if_it_trained_alone(optimizer):
    """--grad-clip takes each member's own gradient norm: member k of an ensemble ends where the single
    network of its seed ends. (One norm over all members would tie a member's step to the others'.)"""
    torch.manual_seed(0)
    x = torch.rand(64, 1)
    data = TrainData(x, x ** 2 + x, x[:0], x[:0] ** 2)
    config = Config(optimizer=optimizer, momentum=0.0, lr=0.1, batch_size=64, epochs=3, schedule="none",
                    grad_clip=0.01, patience=100, hidden=(8,))
    stacked = build_mlp(1, 1, config.replace(ensemble=2))
    train(stacked, data, config.replace(ensemble=2), Reporter(quiet=True))
    for k in range(2):
        torch.manual_seed(k)
        alone = MLP(1, 1, (8,))
        train(alone, data, config, Reporter(quiet=True))
        for name, tensor in stacked.state_dict().items():
            torch.testing.assert_close(tensor[k], alone.state_dict()[name], rtol=0, atol=1e-6)


def test_freezing_and_lr_for_apply_to_every_member():
    model = nnfit.fit(ensemble=3, freeze=["l1"], lr_for={"l3": 1e-2}, epochs=3, **ADAM, **SMALL)
    start = build_mlp(1, 1, Config(ensemble=3, hidden=(16, 16))).to(model.device)
    assert torch.equal(model.module.l1.weight, start.l1.weight)  # all members' first layers stayed put
    assert not torch.equal(model.module.l2.weight, start.l2.weight)
    assert model.summary["frozen"].startswith("l1.weight, l1.bias")


def test_lbfgs_trains_an_ensemble_as_one_closure():
    model = nnfit.fit(ensemble=2, optimizer="lbfgs", epochs=5, **SMALL)
    assert "L-BFGS" in model.summary["recipe"]
    assert model.summary["test"]["mse"] < 1e-3


# 6 steps per epoch. Killed at step 13 with a state every 5 steps: the last state is step 10's; killed at
# step 11 with one every 4: step 8's, in the middle of epoch 2, with each member's permutation and loss.
@pytest.mark.parametrize("every, kill", [("5", "13"), ("4", "11")])
def test_killed_ensemble_run_resumes_to_identical_weights(tmp_path, monkeypatch, every, kill):
    class Killed(BaseException):
        pass

    args = ["train", "--samples", "200", "--hidden", "16,16", "--ensemble", "3", "--optimizer", "adam",
            "--batch-size", "32", "--epochs", "4", "--checkpoint-every", every, "--no-plots", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    monkeypatch.setenv("NNFIT_FAULT", f"kill-at-step:{kill}")
    monkeypatch.setattr(devices, "kill_self", lambda: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        main([*args, "--out", str(tmp_path / "killed")])
    monkeypatch.delenv("NNFIT_FAULT")
    position = json.loads((tmp_path / "killed" / "state.json").read_text())["position"]
    assert position["finished"] == (kill == "13")
    assert main(["resume", str(tmp_path / "killed"), "--quiet"]) == 0
    assert stacked_weights(tmp_path / "killed") == stacked_weights(tmp_path / "whole")


def test_nan_in_one_member_rolls_the_ensemble_back(tmp_path, monkeypatch, capsys):
    real, calls = train_module.make_step, [0]

    def make_step(model, optimizer, plan, config):
        inner = real(model, optimizer, plan, config)

        class Poisoned:
            invalidate = inner.invalidate

            def __call__(self, xb, yb):
                calls[0] += 1
                loss = inner(xb, yb)
                if calls[0] == 15:
                    with torch.no_grad():
                        freeze.unwrap(model).l1.weight[1].fill_(float("nan"))  # member 1 only
                return loss

        return Poisoned()

    monkeypatch.setattr(train_module, "make_step", make_step)
    model = nnfit.fit(ensemble=2, epochs=3, out=str(tmp_path / "run"), **ADAM, **{**SMALL, "quiet": False})
    assert "rolled back to the end of epoch 2" in capsys.readouterr().err
    assert model.summary["rollbacks"][0]["epoch"] == 3
    assert all(torch.isfinite(t).all() for t in model.module.state_dict().values())


def test_ensemble_trains_with_two_ddp_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nnfit", "train", "--samples", "200", "--hidden", "8", "--ensemble", "2",
           "--optimizer", "adam", "--batch-size", "32", "--epochs", "2", "--no-plots", "--quiet", "--out", str(out),
           "--devices", "2", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ensemble"]["members"] == 2
    mean, std = nnfit.load(out).predict([[0.5], [0.7]], return_std=True)
    assert mean.shape == std.shape == (2,)


def test_bad_ensemble_settings_get_one_clear_message():
    with pytest.raises(NnfitError, match="ensemble must be a positive integer, got 0"):
        Config(ensemble=0)

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(NnfitError, match=r"ensemble=3 stacks .* a custom module \(Custom\) cannot be stacked"):
        nnfit.fit(model=Custom(), ensemble=3, epochs=1, **SMALL)
    single = nnfit.fit(epochs=1, **ADAM, **SMALL)
    with pytest.raises(NnfitError, match="single network, so there is no spread to give"):
        single.predict([[0.5]], return_std=True)


def test_ensemble_option_on_the_command_line(tmp_path, capsys):
    assert main(["train", "--ensemble", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--ensemble must be a positive integer, got 0" in capsys.readouterr().err
