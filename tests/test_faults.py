"""Injected faults: a NaN loss, a full disk, SIGTERM and SIGINT. Each checks the message and that
nothing was lost."""

import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import nnfit
from nnfit import checkpoint, trainstate
from nnfit import train as train_module
from nnfit.cli import main
from nnfit.errors import TrainingInterrupted

# 360 training rows in batches of 32: 12 steps an epoch.
ARGS = ["--samples", "400", "--seed", "5", "--optimizer", "adam", "--batch-size", "32", "--no-plots"]
LONG = [*ARGS, "--epochs", "150", "--patience", "1000"]  # long enough to be signalled while it trains


def weights(run) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(run / "model.safetensors").items()}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    assert main(["train", *ARGS, "--epochs", "4", "--quiet", "--out", str(folder / "short")]) == 0
    assert main(["train", *LONG, "--quiet", "--out", str(folder / "long")]) == 0
    return {"short": weights(folder / "short"), "long": weights(folder / "long")}


def poison_steps(monkeypatch, bad):
    """From the training steps in ``bad`` on, the weights become NaN, as after an overflow."""
    real, calls = train_module.make_step, [0]

    def make_step(model, optimizer, plan, config):
        inner = real(model, optimizer, plan, config)

        class Poisoned:
            invalidate = inner.invalidate

            def __call__(self, xb, yb):
                calls[0] += 1
                loss = inner(xb, yb)
                if bad(calls[0]):
                    with torch.no_grad():
                        next(model.parameters()).fill_(float("nan"))
                return loss

        return Poisoned()

    monkeypatch.setattr(train_module, "make_step", make_step)


def test_nan_loss_rolls_back_and_halves_the_learning_rate(tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, lambda n: n == 30)  # once, in epoch 3
    run = tmp_path / "run"
    assert main(["train", *ARGS, "--epochs", "5", "--out", str(run)]) == 0
    _, err = capsys.readouterr()
    assert "the training loss became nan in epoch 3: rolled back to the end of epoch 2" in err
    summary = json.loads((run / "summary.json").read_text())
    [rollback] = summary["rollbacks"]
    assert rollback["epoch"] == 3 and rollback["retry"] == 1
    history = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in history] == [1, 2, 3, 4, 5]  # the lost epoch was trained again
    assert all(math.isfinite(float(v)) for row in history for v in row.split(","))
    assert all(torch.isfinite(t).all() for t in nnfit.load(run).module.state_dict().values())


def test_persistent_nan_stops_with_a_clear_error_and_keeps_the_best_weights(tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, lambda n: n >= 30)
    run = tmp_path / "run"
    assert main(["train", *ARGS, "--epochs", "6", "--out", str(run)]) == 2
    _, err = capsys.readouterr()
    assert "retry 3 of 3" in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("nnfit: error: training diverged: the training loss became nan in epoch 3")
    assert "halved each time" in line and "The best weights (epoch 2, validation loss" in line and str(run) in line
    model = nnfit.load(run)
    assert all(torch.isfinite(t).all() for t in model.module.state_dict().values())
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == 2


def test_disk_full_while_saving_keeps_the_previous_state(baselines, tmp_path, monkeypatch, capsys):
    real, calls = os.fdopen, [0]

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, mode="r", *args, **kwargs):
        calls[0] += 1
        f = real(fd, mode, *args, **kwargs)
        return Full(f) if calls[0] >= 5 else f  # 1-2: step 5, 3-4: step 10, 5: epoch 1's end

    run = tmp_path / "run"
    monkeypatch.setattr(os, "fdopen", fdopen)
    assert main(["train", *ARGS, "--epochs", "4", "--checkpoint-every", "5", "--quiet", "--out", str(run)]) == 2
    monkeypatch.setattr(os, "fdopen", real)
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "state-000003.safetensors" in err
    assert f"the last training state is intact: free some space, then continue with nnfit resume {run}" in err
    state = trainstate.load(run)
    assert state.position["step"] == 10 and not state.position["finished"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert main(["resume", str(run)]) == 0
    assert weights(run) == baselines["short"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_state_and_resume_finishes_identically(baselines, tmp_path, sig, code):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "NNFIT_FAULT"}
    proc = subprocess.Popen([sys.executable, "-m", "nnfit", "train", *LONG, "--out", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # progress goes to stderr: wait for the first epoch line
            if line.startswith("epoch"):
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    name = signal.Signals(sig).name
    assert f"nnfit: {name}: training stopped at " in err
    assert f"the training state is saved in {run}; continue with: nnfit resume {run}" in err
    assert "Traceback" not in err
    assert checkpoint.has_state(run) and not (run / "model.safetensors").exists()
    assert main(["resume", str(run)]) == 0
    assert weights(run) == baselines["long"]


def test_a_second_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as caught:
        with trainstate.handling_signals(), trainstate.phase("training", deferred=True):
            os.kill(os.getpid(), signal.SIGINT)
            assert trainstate.STOP.signal == signal.SIGINT  # in training, the first one only asks
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert caught.value.exit_code == 130 and "stopped at once" in str(caught.value)
    assert signal.getsignal(signal.SIGINT) is before and trainstate.STOP.signal is None


def test_the_library_installs_no_signal_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    nnfit.fit(samples=100, epochs=1, quiet=True)
    assert {s: signal.getsignal(s) for s in before} == before
