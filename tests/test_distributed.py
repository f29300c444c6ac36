"""DistributedDataParallel with 2 CPU processes over gloo: the launcher, torchrun, and failures.

Few tests, each starting processes once (they are slow to start)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nnfit
from nnfit import launch

SETTINGS = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=400, test_samples=200, dtype="float64",
                device="cpu", quiet=True, plots=False)
RUNS = {"adam": dict(optimizer="adam", batch_size=64, epochs=4), "lbfgs": dict(optimizer="lbfgs", epochs=2)}
ENV = {**os.environ, "PYTHONPATH": str(Path(nnfit.__file__).parents[1])}


def _ranks(rank, folder):
    """Each rank trains both recipes, and records its weights, its history and how often it saved."""
    from nnfit.api import FittedModel

    saves = []
    original = FittedModel._write  # what writes a run folder (save() claims the folder, then calls it)
    FittedModel._write = lambda self, *a, **k: saves.append(1) or original(self, *a, **k)
    for name, run in RUNS.items():
        model = nnfit.fit(**SETTINGS, **run, out=str(Path(folder) / f"run-{name}"))
        save_file(model.module.state_dict(), str(Path(folder) / f"{name}-{rank}.safetensors"))
        Path(folder, f"{name}-{rank}.json").write_text(json.dumps(model.history))
    Path(folder, f"saves-{rank}.json").write_text(json.dumps(len(saves)))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    launch.run_workers(_ranks, (str(folder),), 2)
    return folder


@pytest.mark.parametrize("name", RUNS)
def test_all_ranks_end_with_bit_identical_weights(ddp, name):
    rank0, rank1 = (load_file(str(ddp / f"{name}-{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


@pytest.mark.parametrize("name", RUNS)
def test_loss_per_epoch_matches_one_process_with_the_same_global_batch(ddp, name):
    single = nnfit.fit(**SETTINGS, **RUNS[name])
    history = json.loads((ddp / f"{name}-0.json").read_text())
    assert len(history) == len(single.history)
    for ours, theirs in zip(history, single.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-9)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-9)  # the whole validation set


def test_run_folder_is_written_once_and_loads_without_ddp(ddp):
    assert [json.loads((ddp / f"saves-{r}.json").read_text()) for r in (0, 1)] == [2, 0]
    loaded = nnfit.load(ddp / "run-adam")
    assert not isinstance(loaded.module, torch.nn.parallel.DistributedDataParallel)
    weights = load_file(str(ddp / "adam-0.safetensors"))
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, weights[key])  # no 'module.' prefix: the unwrapped module's state_dict
    summary = loaded.summary
    assert summary["world_size"] == 2 and "largest over the ranks" in summary["peak_memory"]["measure"]


def _train_command(out):
    return ["train", "--formula", "x**2 + x", "--domain", "x=0:1", "--samples", "400", "--test-samples", "200",
            "--optimizer", "adam", "--batch-size", "64", "--epochs", "2", "--device", "cpu", "--no-plots",
            "--out", str(out)]


@pytest.mark.parametrize("launcher", ["--devices", "torchrun"])
def test_command_line_trains_with_two_processes(tmp_path, launcher):
    out = tmp_path / "run"
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nnfit",
               *_train_command(out)]
    else:
        cmd = [sys.executable, "-m", "nnfit", *_train_command(out), "--devices", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("run folder:") == 1  # only rank 0 reports
    assert "DDP over gloo" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert nnfit.load(out).predict([[0.5]]).shape == (1,)


CRASHES = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from nnfit import launch
    from nnfit.errors import NnfitError

    def worker(rank, how):
        dist.init_process_group("gloo")
        if rank == 1:
            if how == "raise":
                raise RuntimeError("boom in worker 1")
            if how == "exit":
                os._exit(3)
            raise NnfitError("column 'y' not found")
        dist.barrier()  # rank 0 waits for a peer that never comes: the launcher must stop it

    if __name__ == "__main__":
        for how in ("raise", "exit", "user"):
            try:
                launch.run_workers(worker, (how,), 2)
            except NnfitError as exc:
                print(exc, flush=True)
""")


def test_a_crashed_worker_fails_the_run_promptly_with_its_message(tmp_path):
    script = tmp_path / "crashes.py"
    script.write_text(CRASHES)
    # The bounded wait: a hang fails this test by timeout instead of blocking the suite.
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, env=ENV)
    lines = done.stdout.splitlines()
    assert lines[0] == ("worker 1 of 2 failed with RuntimeError: boom in worker 1 (its traceback is above); "
                        "the other workers were stopped")
    assert lines[1] == "worker 1 of 2 exited with code 3; the other workers were stopped"
    assert lines[2] == "worker 1 of 2: column 'y' not found"
    assert "RuntimeError: boom in worker 1" in done.stderr  # the traceback reached the terminal


def test_signals_save_the_state_of_a_two_worker_run_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    long = [*_train_command(out), "--batch-size", "32", "--epochs", "100", "--patience", "1000", "--devices", "2"]

    def stopped(args, sig, group):
        # start_new_session: killpg reaches the launcher and its workers, as a terminal's Ctrl-C does.
        proc = subprocess.Popen([sys.executable, "-m", "nnfit", *args], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            for line in proc.stderr:  # progress goes to stderr: wait for the first epoch line
                if line.startswith("epoch"):
                    break
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 128 + sig, err
        assert err.count(f"nnfit: {signal.Signals(sig).name}: training stopped at the end of epoch ") == 1
        assert f"the training state is saved in {out}; continue with: nnfit resume {out}" in err
        assert "Traceback" not in err
        assert (out / "state.json").exists() and not (out / "model.safetensors").exists()
        return json.loads((out / "state.json").read_text())["position"]["epoch"]

    first = stopped(long, signal.SIGINT, group=True)
    second = stopped(["resume", str(out)], signal.SIGTERM, group=False)  # resume relaunches two workers
    assert second > first
    done = subprocess.run([sys.executable, "-m", "nnfit", "resume", str(out)], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr
    assert "DDP over gloo" in done.stderr and (out / "model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 100
