import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from nnfit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_predict_evaluate_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--formula", "x**2 + x", "--domain", "x=0:1", "--samples", "500",
                          "--out", str(out), "--quiet")
    assert code == 0
    assert "MSE" in stdout and "run folder" in stdout
    assert stdout.splitlines()[0].startswith("formula 'x**2 + x': ")  # the result, no blank line before it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["mse"] < 1e-4

    code, stdout, _ = run(capsys, "predict", str(out), "--input", "x=0.5,1")
    assert code == 0
    frame = pd.read_csv(__import__("io").StringIO(stdout))
    assert list(frame.columns) == ["x", "y_pred"]
    assert np.allclose(frame["y_pred"], [0.75, 2.0], atol=1e-2)

    table = tmp_path / "new.csv"
    pd.DataFrame({"x": [0.1, 0.2], "y": [0.11, 0.24]}).to_csv(table, index=False)
    code, _, _ = run(capsys, "predict", str(out), "--data", str(table), "--out", str(tmp_path / "p.csv"))
    assert code == 0
    preds = pd.read_csv(tmp_path / "p.csv")
    assert np.allclose(preds["y_pred"], [0.11, 0.24], atol=1e-2)

    code, stdout, _ = run(capsys, "evaluate", str(out), "--json")
    assert code == 0 and json.loads(stdout)["mse"] < 1e-4
    code, stdout, _ = run(capsys, "evaluate", str(out), "--data", str(table), "--json")
    assert code == 0 and json.loads(stdout)["mae"] < 1e-2


@pytest.mark.parametrize("argv, phrase", [
    (["train", "--lr", "-1", "--batch-size", "0"], "--lr must be a positive number"),
    (["train", "--lr", "-1", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["train", "--optimizer", "newton"], "--optimizer must be one of"),
    (["train", "--formula", "x**2", "--data", "t.csv"], "choose one source"),
    (["train", "--formula", "x**2"], "variable 'x' has no domain"),
    (["train", "--formula", "x.real", "--domain", "x=0:1"], "attribute access"),
    (["train", "--formula", "x", "--domain", "x=1:1"], "is empty"),
    (["train", "--formula", "x", "--domain", "x=2:1"], "reversed bounds"),
    (["train", "--formula", "x", "--domain", "x0:1"], "NAME=LOW:HIGH"),
    (["train", "--data", "missing.csv", "--target", "y"], "file not found: missing.csv"),
    (["train", "--device", "cuda:7"], "devices here: cpu"),
    (["train", "--bogus"], "unrecognized arguments"),
    (["predict", "no-such-run", "--input", "x=1"], "does not exist"),
    (["evaluate", "no-such-run"], "does not exist"),
])
def test_mistakes_exit_2_with_one_line(argv, phrase, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run(capsys, *argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnfit: error: ")
    assert phrase in lines[0]
    assert "Traceback" not in stderr


def test_predict_input_errors(tutorial_run, capsys):
    _, out = tutorial_run
    for argv, phrase in ((["--input", "z=1"], "not an input"), (["--input", "x=abc"], "not a number"),
                         ([], "no inputs given")):
        code, _, err = run(capsys, "predict", str(out), *argv)
        assert code == 2 and phrase in err


def test_predict_table_with_extra_column_is_refused(tutorial_run, capsys, tmp_path):
    _, out = tutorial_run
    table = tmp_path / "extra.csv"
    pd.DataFrame({"x": [0.1], "w": [2.0]}).to_csv(table, index=False)
    code, _, err = run(capsys, "predict", str(out), "--data", str(table))
    assert code == 2 and "unexpected column(s) w" in err


def test_subprocess_train_and_error(tmp_path):
    out = tmp_path / "run"
    ok = subprocess.run([sys.executable, "-m", "nnfit", "train", "--samples", "300", "--epochs", "5",
                         "--out", str(out), "--no-plots"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (out / "model.safetensors").exists() and not (out / "fit.png").exists()
    assert "epoch" in ok.stderr  # plain progress lines off a terminal
    assert "\r" not in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "nnfit", "train", "--formula", "open('f')", "--domain", "x=0:1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert "unknown function 'open'" in bad.stderr and "Traceback" not in bad.stderr


def test_help_does_not_import_torch():
    code = "import sys; from nnfit.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: nnfit" in result.stdout


def test_debug_shows_the_traceback(capsys):
    from nnfit.errors import NnfitError

    with pytest.raises(NnfitError):
        main(["--debug", "train", "--lr", "-1"])


def test_log_every_prints_batch_lines(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--samples", "200", "--optimizer", "adam", "--batch-size", "10",
                       "--epochs", "1", "--log-every", "5", "--out", str(tmp_path / "r"), "--no-plots")
    assert code == 0
    assert "epoch 1 batch 5: loss" in err and "epoch 1 batch 15: loss" in err


TRAIN = [sys.executable, "-m", "nnfit", "train", "--samples", "300", "--epochs", "5", "--no-plots"]


@pytest.mark.parametrize("closed", ["stderr", "stdout", "both"])
def test_a_closed_pipe_never_loses_the_run(tmp_path, closed):
    # nnfit train ... 2>&1 | head -1: the reader goes away while progress is still being written
    out = tmp_path / "run"
    proc = subprocess.Popen([*TRAIN, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name in ("stdout", "stderr"):
        if closed in (name, "both"):
            getattr(proc, name).close()  # closed before the first line: every write meets a closed pipe
    left = [s for s in (proc.stdout, proc.stderr) if not s.closed]
    texts = [s.read().decode() for s in left]
    assert proc.wait(timeout=300) == 0, texts
    assert (out / "model.safetensors").exists() and (out / "summary.json").exists()
    assert all("Traceback" not in t and "Exception ignored" not in t for t in texts)


def test_stdout_closed_after_its_first_line_exits_0(tutorial_run, tmp_path):
    _, run_folder = tutorial_run  # nnfit inspect RUN | head -1
    proc = subprocess.Popen([sys.executable, "-m", "nnfit", "inspect", str(run_folder)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("parameter")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_predict_never_writes_over_its_data_or_an_existing_file(tutorial_run, capsys, tmp_path):
    _, run_folder = tutorial_run
    table = tmp_path / "measurements.csv"
    table.write_text("x\n0.5\n")
    code, _, err = run(capsys, "predict", str(run_folder), "--data", str(table), "--out", str(table), "--overwrite")
    assert code == 2 and "is the --data file" in err and "choose another --out" in err
    assert table.read_text() == "x\n0.5\n"
    other = tmp_path / "kept.csv"
    other.write_text("mine\n")
    code, _, err = run(capsys, "predict", str(run_folder), "--data", str(table), "--out", str(other))
    assert code == 2 and "already exists" in err and "pass --overwrite" in err
    assert other.read_text() == "mine\n"
    code, _, _ = run(capsys, "predict", str(run_folder), "--data", str(table), "--out", str(other), "--overwrite")
    assert code == 0 and list(pd.read_csv(other).columns) == ["x", "y_pred"]
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "predict", str(run_folder), "--data", str(table), "--out", str(fifo), "--overwrite")
    assert code == 2 and "is a FIFO (named pipe), not a regular file; nnfit writes only regular files" in err
    assert fifo.is_fifo()


def test_export_never_writes_over_an_existing_file(tutorial_run, capsys, tmp_path):
    _, run_folder = tutorial_run
    table = tmp_path / "measurements.csv"
    table.write_text("x,y\n0.5,0.75\n")
    code, _, err = run(capsys, "export", str(run_folder), "--format", "torchscript", "--out", str(table))
    assert code == 2 and err.count("\n") == 1
    assert f"--out {table} already exists" in err and "pass --overwrite" in err
    assert table.read_text() == "x,y\n0.5,0.75\n"
    code, _, _ = run(capsys, "export", str(run_folder), "--format", "torchscript", "--out", str(tmp_path / "m.pt"))
    assert code == 0
    code, _, _ = run(capsys, "export", str(run_folder), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                     "--overwrite")
    assert code == 0


def test_a_parent_of_runs_is_not_a_run_folder(tutorial_run, capsys):
    _, run_folder = tutorial_run
    code, _, err = run(capsys, "predict", str(run_folder.parent), "--input", "x=1")
    assert code == 2 and err.count("\n") == 1
    assert f"{run_folder.parent} is not a run folder" in err and f"run folders inside it: {run_folder}" in err


def test_a_run_in_progress_or_stopped_is_named_as_such(tmp_path, capsys):
    run_folder = tmp_path / "k2"
    proc = subprocess.Popen([*TRAIN[:6], "--epochs", "100000", "--patience", "100000", "--no-plots",
                             "--out", str(run_folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # training: the folder's lock is held
            if line.startswith("epoch"):
                break
        code, _, err = run(capsys, "predict", str(run_folder), "--input", "x=1")
        assert code == 2 and f"another nnfit process (pid {proc.pid}) is writing {run_folder}" in err
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and (run_folder / "state.json").exists()
    for argv in (["predict", str(run_folder), "--input", "x=1"], ["evaluate", str(run_folder)],
                 ["inspect", str(run_folder)], ["export", str(run_folder), "--format", "torchscript"],
                 ["train", "--init-from", str(run_folder), "--out", str(tmp_path / "k3"), "--epochs", "1"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1, argv
        assert f"{run_folder} holds an unfinished run" in err and f"nnfit resume {run_folder}" in err, argv
