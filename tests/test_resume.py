"""Exact resume: a run killed anywhere continues, with ``nnfit resume RUN``, to final weights that are
bit-identical to those of an uninterrupted run (fixed seed; on the CPU, and on a CUDA GPU with device auto)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from nnfit import checkpoint, devices
from nnfit.cli import main

COMMON = ["--samples", "400", "--seed", "3", "--no-plots", "--quiet"]
RECIPES = {
    # 360 training rows in batches of 32: 12 steps an epoch, the last one of 8 rows.
    "adam-onecycle": ["--optimizer", "adam", "--epochs", "6", "--batch-size", "32", "--checkpoint-every", "5"],
    "sgd-cosine-unfreeze": ["--optimizer", "sgd", "--schedule", "cosine", "--epochs", "5", "--batch-size", "48",
                            "--freeze", "l1", "--unfreeze-at", "2:l1", "--checkpoint-every", "4"],
    "lbfgs": ["--epochs", "8"],  # full batch: one step an epoch, saved at epoch ends (the default)
}


def weights(run) -> dict[str, bytes]:
    """Each tensor's bytes: equal means bit-identical (the file's header order may vary)."""
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(run / "model.safetensors").items()}


def train_args(recipe, out):
    return ["train", *COMMON, *RECIPES[recipe], "--out", str(out)]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The uninterrupted runs' weights, as bytes (the same process runs the resumes)."""
    folder = tmp_path_factory.mktemp("baseline")
    out = {}
    for recipe in RECIPES:
        assert main(train_args(recipe, folder / recipe)) == 0
        out[recipe] = weights(folder / recipe)
        assert not checkpoint.has_state(folder / recipe), "a finished run keeps no training state"
    return out


def run_cli(args, fault=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "NNFIT_FAULT"}
    if fault:
        env["NNFIT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "nnfit", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)


def leftovers(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".") or p.name.startswith("state"))


@pytest.mark.parametrize("recipe, fault, saved_at", [
    ("adam-onecycle", "kill-at-step:23", {"epoch": 2, "step": 8, "finished": False}),  # mid-epoch
    # Writes: per save the tensors, then state.json (which holds the config). Write 3 is the second save's
    # tensors, write 4 its state.json: the new tensor file is in place but not yet named by state.json.
    ("adam-onecycle", "kill-during-save:3", {"epoch": 1, "step": 5, "finished": False}),
    ("adam-onecycle", "kill-during-save:4", {"epoch": 1, "step": 5, "finished": False}),
    ("sgd-cosine-unfreeze", "kill-at-step:15", {"epoch": 2, "step": 4, "finished": False}),  # after an unfreeze
    ("lbfgs", "kill-at-step:3", {"epoch": 1, "finished": True}),
])
def test_killed_run_resumes_to_identical_weights(baseline, tmp_path, recipe, fault, saved_at):
    run = tmp_path / "run"
    killed = run_cli(train_args(recipe, run), fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((run / "state.json").read_text())
    if recipe == "lbfgs":  # epoch ends are saved at most once a second by default: at least epoch 1
        assert state["position"]["finished"] and state["position"]["epoch"] >= 1
    else:
        assert {k: state["position"][k] for k in saved_at} == saved_at
    assert main(["resume", str(run)]) == 0
    assert weights(run) == baseline[recipe]
    assert leftovers(run) == [], "the state and any half-written temporary file are gone"
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.csv", "model.json", "model.safetensors",
                                               "summary.json"}


def test_resume_in_process_after_a_simulated_kill_and_the_history_is_whole(baseline, tmp_path, monkeypatch,
                                                                          capsys):
    class Killed(BaseException):
        pass

    def kill():
        raise Killed

    run = tmp_path / "run"
    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:40")
    monkeypatch.setattr(devices, "kill_self", kill)
    with pytest.raises(Killed):
        main(train_args("adam-onecycle", run))
    monkeypatch.delenv("NNFIT_FAULT")
    capsys.readouterr()
    assert main(["resume", str(run), "--debug"]) == 0
    out, _ = capsys.readouterr()
    assert f"run folder: {run}" in out
    assert weights(run) == baseline["adam-onecycle"]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [int(float(line.split(",")[0])) for line in rows[1:]] == list(range(1, 7)), rows[0]
    config = json.loads((run / "config.json").read_text())
    assert config["resume"] is False and config["checkpoint_every"] == 5


def test_resume_refuses_changed_data(tmp_path, monkeypatch, capsys):
    table = tmp_path / "t.csv"
    table.write_text("x,y\n" + "".join(f"{i / 40},{(i / 40) ** 2}\n" for i in range(40)))
    run = tmp_path / "run"
    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:3")
    monkeypatch.setattr(devices, "kill_self", lambda: (_ for _ in ()).throw(SystemExit(137)))
    with pytest.raises(SystemExit):
        main(["train", "--data", str(table), "--target", "y", "--optimizer", "adam", "--batch-size", "8",
              "--checkpoint-every", "2", "--epochs", "3", "--no-plots", "--quiet", "--out", str(run)])
    monkeypatch.delenv("NNFIT_FAULT")
    table.write_text("x,y\n" + "".join(f"{i / 40},{(i / 40) ** 3}\n" for i in range(40)))
    capsys.readouterr()
    assert main(["resume", str(run)]) == 2
    assert "not those the run" in capsys.readouterr().err


def test_every_rng_state_round_trips():
    import random

    import numpy as np
    import torch

    from nnfit import trainstate
    from nnfit.train import TrainResult

    class Plan:
        scaler = micro = eval_chunk = None
        guard = type("Guard", (), {"retries": []})()

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    generator = torch.Generator().manual_seed(1)
    state = trainstate.capture(model, optimizer, None, Plan, generator, TrainResult(None), {}, {},
                               {"epoch": 0, "finished": True, "step": 0, "rows": 0, "steps": 0})

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=generator))

    first = draws()
    draws()
    trainstate.restore_rng(state, generator)
    assert draws() == first


def test_resume_a_table_run_from_another_folder(tmp_path, monkeypatch, capsys):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    (start / "t.csv").write_text("x,y\n" + "".join(f"{i / 40},{(i / 40) ** 2}\n" for i in range(40)))
    monkeypatch.chdir(start)
    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:3")
    monkeypatch.setattr(devices, "kill_self", lambda: (_ for _ in ()).throw(SystemExit(137)))
    with pytest.raises(SystemExit):
        main(["train", "--data", "t.csv", "--target", "y", "--optimizer", "adam", "--batch-size", "8",
              "--checkpoint-every", "2", "--epochs", "3", "--no-plots", "--quiet", "--out", str(tmp_path / "run")])
    monkeypatch.delenv("NNFIT_FAULT")
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["resume", str(tmp_path / "run")]) == 2
    assert "pass the table's path: --data PATH" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "run"), "--data", str(start / "t.csv"), "--quiet"]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()


STATE_EDITS = {
    "params of another size": lambda st: st["optimizer"]["param_groups"][0].__setitem__("params", [0]),
    "params that are text": lambda st: st["optimizer"]["param_groups"][0].__setitem__("params", "abc"),
    "no params": lambda st: st["optimizer"]["param_groups"][0].pop("params"),
    "state of the wrong kind": lambda st: st["optimizer"].__setitem__("state", [[0]]),
    "a packed item that is a number": lambda st: st["optimizer"].__setitem__("state", {"__items__": 5}),
    "a rollback without its fields": lambda st: st.__setitem__("rollbacks", [{"a": 1}]),
    "an epoch without its fields": lambda st: st["history"].__setitem__(0, {"epoch": None}),
}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run killed mid-training, its state saved: (folder, state.json)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    env = {**os.environ, "NNFIT_FAULT": "kill-at-step:30"}
    subprocess.run([sys.executable, "-m", "nnfit", "train", "--samples", "400", "--optimizer", "adam", "--batch-size",
                    "32", "--epochs", "5", "--checkpoint-every", "10", "--no-plots", "--quiet", "--out", str(run)],
                   env=env, capture_output=True)
    return run, json.loads((run / "state.json").read_text())


@pytest.mark.parametrize("edit", STATE_EDITS)
def test_an_edited_training_state_is_one_error_line(stopped_run, tmp_path, capsys, edit):
    import shutil

    folder, state = stopped_run
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    state = json.loads(json.dumps(state))
    STATE_EDITS[edit](state)
    (run / "state.json").write_text(json.dumps(state))
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnfit: error: ") and ("edited or damaged" in err[0]
                                                                       or "was edited" in err[0]), err


def test_unpacking_the_optimizer_state_copies_only_its_own_tensors():
    """A rollback copies the optimizer's tensors (it updates them in place), not the model's, best and start
    weights that the same state holds: copying those too would double the state's GPU memory for a moment."""
    from types import SimpleNamespace
    import torch
    from nnfit import trainstate

    class NotToCopy:
        def clone(self):
            pytest.fail("a model tensor was copied to unpack the optimizer state")

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    optimizer.step()
    tensors = {}
    info = {"optimizer": checkpoint.pack(optimizer.state_dict(), "optimizer", tensors)}
    state = SimpleNamespace(tensors={**tensors, "model/weight": NotToCopy(), "best/weight": NotToCopy()}, info=info)
    unpacked = trainstate.unpacked(state, "optimizer")
    saved = unpacked["state"][0]["exp_avg"]
    assert torch.equal(saved, optimizer.state[model.weight]["exp_avg"])
    assert saved.data_ptr() != tensors["optimizer/state/0/exp_avg"].data_ptr()  # a copy, not the state's own


def test_only_the_runs_own_cuda_generator_is_saved_and_restored(monkeypatch):
    """A state holds the run's GPU's generator (not every GPU's as rank 0 sees them); a resume restores it
    into the run's GPU, and says so when a saved state cannot be restored (an older state with the generators
    of GPUs 0 and 2, resumed on cuda:1)."""
    import torch

    from nnfit import trainstate
    from nnfit.train import TrainResult

    gpu = torch.device("cuda", 1)

    class Plan:
        scaler = micro = eval_chunk = None
        device = gpu
        guard = type("Guard", (), {"retries": []})()

    saved_states = {1: torch.arange(8, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index: saved_states[index].clone())
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, index: restored.append((s.tolist(), index)))
    model = torch.nn.Linear(2, 1)
    generator = torch.Generator().manual_seed(1)
    state = trainstate.capture(model, torch.optim.Adam(model.parameters()), None, Plan, generator,
                               TrainResult(None), {}, {}, {"epoch": 0, "finished": True, "step": 0, "rows": 0,
                                                           "steps": 0})
    assert [k for k in state.tensors if k.startswith("rng/cuda/")] == ["rng/cuda/1"]
    notes = []
    trainstate.restore_rng(state, generator, torch.device("cuda", 0), notes.append)  # resumed on another GPU
    assert restored == [(list(range(8)), 0)] and notes == []
    older = {**{k: v for k, v in state.tensors.items() if not k.startswith("rng/cuda/")},
             "rng/cuda/0": torch.zeros(8, dtype=torch.uint8), "rng/cuda/2": torch.ones(8, dtype=torch.uint8)}
    trainstate.restore_rng(trainstate.State(older, state.info, state.history_of), generator, gpu, notes.append)
    assert len(restored) == 1 and len(notes) == 1 and "does not fit cuda:1" in notes[0]
