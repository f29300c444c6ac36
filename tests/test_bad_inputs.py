"""Every user mistake: one row each, with the exit code and the key phrase of the message.

None may produce a traceback, a hang, a silent wrong result or a partial run folder.
"""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nnfit.cli import main

NUMERIC_OPTIONS = [
    ("--samples", "0", "--samples must be a positive integer"),
    ("--test-samples", "-5", "--test-samples must be a positive integer"),
    ("--epochs", "0", "--epochs must be a positive integer"),
    ("--batch-size", "0", "--batch-size must be a positive integer"),
    ("--patience", "-1", "--patience must be a positive integer"),
    ("--log-every", "0", "--log-every must be a positive integer"),
    ("--lr", "-0.1", "--lr must be a positive number"),
    ("--lr", "nan", "--lr must be a positive number"),
    ("--time-budget", "0", "--time-budget must be a positive number"),
    ("--grad-clip", "-1", "--grad-clip must be a positive number"),
    ("--weight-decay", "-1", "--weight-decay must be 0 or more"),
    ("--momentum", "1.5", "--momentum must be in [0, 1)"),
    ("--val-split", "1", "--val-split must be in [0, 1)"),
    ("--seed", "-3", "--seed must be 0 or more"),
    ("--hidden", "0,10", "--hidden must be positive widths"),
    ("--epochs", "ten", "--epochs must be an integer, got 'ten'"),
    ("--lr", "fast", "--lr must be a number, got 'fast'"),
]
CHOICES = [
    ("--optimizer", "newton", "--optimizer must be one of auto, adam, adamw, sgd, lbfgs"),
    ("--schedule", "step", "--schedule must be one of"),
    ("--activation", "swish", "--activation must be one of relu, tanh"),
    ("--dtype", "float16", "--dtype must be one of float32, float64"),
    ("--nonfinite", "zero", "--nonfinite must be one of drop, error"),
    ("--device", "tpu", "unknown device 'tpu'"),
    ("--device", "cuda:3", "devices here: cpu"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("x,y\n")
    (d / "ragged.csv").write_text("x,y\n1,2\n3,4,5\n6,7\n")
    (d / "text.csv").write_text("x,y\n1,2\nabc,4\n5,6\n")
    (d / "nan.csv").write_text("x,y\n1,2\n2,\n3,6\n")
    (d / "inf.csv").write_text("x,y\n1,2\n2,inf\n3,6\n")
    (d / "dup.csv").write_text("x,x,y\n1,2,3\n4,5,6\n")
    (d / "one_row.csv").write_text("x,y\n1,2\n")
    (d / "one_col.csv").write_text("y\n1\n2\n3\n")
    (d / "good.csv").write_text("x,y\n" + "".join(f"{i / 50},{(i / 50) ** 2}\n" for i in range(50)))
    (d / "binary.csv").write_bytes(bytes(range(256)) * 8)
    pq.write_table(pa.table({"x": [1.0, 2.0], "y": [[1.0], [2.0]]}), d / "nested.parquet")
    np.save(d / "cube.npy", np.zeros((4, 3, 2)))
    np.savez(d / "noX.npz", y=np.zeros(5))
    (d / "folder.csv").mkdir()
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--samples", "200", "--epochs", "3", "--out", str(out), "--quiet", "--no-plots"]) == 0
    return out


def check(capsys, argv, code, phrase, out=None):
    assert main(argv) == code
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("nnfit: error: ")
    assert phrase in err, err
    if out is not None:
        assert not os.path.exists(out), "a failed run must not leave a run folder"


TABLE_ROWS = [
    ("empty.csv", "is empty"),
    ("header.csv", "has 0 rows; at least 2 are needed"),
    ("ragged.csv", "could not read"),
    ("text.csv", "non-numeric"),
    ("nan.csv", "row 2 column 'y'"),
    ("inf.csv", "row 2 column 'y' (inf)"),
    ("dup.csv", "repeated column names: x"),
    ("one_row.csv", "has 1 rows; at least 2 are needed"),
    ("one_col.csv", "no input columns left"),
    ("binary.csv", "binary"),
    ("nested.parquet", "nested"),
    ("cube.npy", "3"),
    ("noX.npz", "'X'"),
    ("folder.csv", "is a directory"),
    ("missing.csv", "file not found"),
]


@pytest.mark.parametrize("name, phrase", TABLE_ROWS)
def test_bad_tables(files, tmp_path, capsys, name, phrase):
    target = [] if name.endswith((".npy", ".npz")) else ["--target", "y"]
    out = tmp_path / "out"
    check(capsys, ["train", "--data", str(files / name), *target, "--out", str(out)], 2, phrase, out)


def test_missing_target_and_input_columns(files, tmp_path, capsys):
    check(capsys, ["train", "--data", str(files / "good.csv"), "--target", "z", "--out", str(tmp_path / "o")],
          2, "columns are: x, y", tmp_path / "o")
    check(capsys, ["train", "--data", str(files / "good.csv"), "--target", "y", "--inputs", "w",
                   "--out", str(tmp_path / "o")], 2, "input column 'w' not found", tmp_path / "o")
    check(capsys, ["train", "--data", str(files / "good.csv"), "--out", str(tmp_path / "o")],
          2, "no target given", tmp_path / "o")


def test_huge_claimed_size(files, tmp_path, capsys, monkeypatch):
    from nnfit import tables

    monkeypatch.setattr(tables, "MAX_BYTES", 10)
    check(capsys, ["train", "--data", str(files / "good.csv"), "--target", "y", "--out", str(tmp_path / "o")],
          2, "nnfit reads tables up to", tmp_path / "o")


def test_no_read_permission(files, tmp_path, capsys, monkeypatch):
    import builtins

    real_open = builtins.open

    def guarded(path, *a, **k):
        if str(path).endswith("good.csv"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    check(capsys, ["train", "--data", str(files / "good.csv"), "--target", "y", "--out", str(tmp_path / "o")],
          2, "no permission to read", tmp_path / "o")


FORMULA_ROWS = [
    (["--formula", "x**2 +", "--domain", "x=0:1"], "not valid syntax"),
    (["--formula", "gamma(x)", "--domain", "x=0:1"], "unknown function 'gamma'"),
    (["--formula", "x.imag", "--domain", "x=0:1"], "attribute access"),
    (["--formula", "__class__", "--domain", "x=0:1"], "dunder"),
    (["--formula", "9**9**9", "--domain", "x=0:1"], "exponent"),
    (["--formula", "x**2", "--domain", "x=1:1"], "is empty"),
    (["--formula", "x**2", "--domain", "x=1:0"], "reversed bounds"),
    (["--formula", "x*y", "--domain", "x=0:1"], "variable 'y' has no domain"),
    (["--formula", "sqrt(x)", "--domain", "x=-1:1", "--nonfinite", "error"], "or pass --nonfinite drop"),
    (["--formula", "log(x)", "--domain", "x=-2:-1"], "NaN or infinite at 1000 of 1000"),
]


@pytest.mark.parametrize("argv, phrase", FORMULA_ROWS)
def test_bad_formulas(tmp_path, capsys, argv, phrase):
    out = tmp_path / "o"
    check(capsys, ["train", *argv, "--out", str(out)], 2, phrase, out)


def test_division_by_zero_in_the_domain_warns_with_the_count(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--formula", "1/(x - x)", "--domain", "x=0:1", "--samples", "100",
                 "--out", str(out)]) == 2
    _, err = capsys.readouterr()
    assert "NaN or infinite at 100 of 100" in err and not out.exists()
    assert main(["train", "--formula", "sqrt(x)", "--domain", "x=-0.1:1", "--samples", "400", "--epochs", "2",
                 "--out", str(out), "--quiet", "--no-plots"]) == 0
    _, err = capsys.readouterr()
    assert "nnfit: warning:" in err and "they were dropped" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["train"] + summary["samples"]["validation"] < 400


@pytest.mark.parametrize("flag, value, phrase", NUMERIC_OPTIONS + CHOICES)
def test_bad_settings(tmp_path, capsys, flag, value, phrase):
    out = tmp_path / "o"
    check(capsys, ["train", flag, value, "--out", str(out)], 2, phrase, out)


def test_conflicting_options(files, tmp_path, capsys):
    out = tmp_path / "o"
    check(capsys, ["train", "--formula", "x", "--domain", "x=0:1", "--data", str(files / "good.csv"),
                   "--out", str(out)], 2, "choose one source", out)
    check(capsys, ["train", "--quiet", "--verbose", "--out", str(out)], 2, "choose one", out)
    check(capsys, ["train", "--domain", "x=0:1", "--out", str(out)], 2, "--domain was given without --formula", out)


def _copy(run_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def test_missing_run_folder(tmp_path, capsys):
    check(capsys, ["predict", str(tmp_path / "nope"), "--input", "x=1"], 2, "does not exist")


def test_corrupted_weights(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    blob = bytearray((run / "model.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (run / "model.safetensors").write_bytes(bytes(blob))
    check(capsys, ["predict", str(run), "--input", "x=1"], 2, "does not match the checksum")


def test_truncated_weights(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    blob = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    check(capsys, ["evaluate", str(run)], 2, "truncated, corrupted")


def test_edited_metadata(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["weights"]["sha256"] = "0" * 64
    (run / "model.json").write_text(json.dumps(meta))
    check(capsys, ["predict", str(run), "--input", "x=1"], 2, "checksum")
    (run / "model.json").write_text("{not json")
    check(capsys, ["predict", str(run), "--input", "x=1"], 2, "not valid JSON")


def test_newer_format_names_both_versions(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["format_version"] = 99
    meta["nnfit_version"] = "9.0.0"
    (run / "model.json").write_text(json.dumps(meta))
    check(capsys, ["predict", str(run), "--input", "x=1"], 2, "format version 99")
    _, err = capsys.readouterr()


def test_predict_with_wrong_columns_or_nan(run_dir, tmp_path, capsys):
    (tmp_path / "missing.csv").write_text("z\n1\n")
    (tmp_path / "extra.csv").write_text("x,w\n1,2\n")
    (tmp_path / "nan.csv").write_text("x\n1\nnan\n")
    check(capsys, ["predict", str(run_dir), "--data", str(tmp_path / "missing.csv")], 2, "missing input column(s) x")
    check(capsys, ["predict", str(run_dir), "--data", str(tmp_path / "extra.csv")], 2, "unexpected column(s) w")
    check(capsys, ["predict", str(run_dir), "--data", str(tmp_path / "nan.csv")], 2, "row 2 column 'x'")
    check(capsys, ["predict", str(run_dir), "--input", "x=nan"], 2, "--input 'x=nan' holds a NaN")
    check(capsys, ["predict", str(run_dir), "--input", "x=1,inf"], 2, "an infinity")


@pytest.fixture
def killed_run(tmp_path, monkeypatch):
    """A run folder with a training state, as a killed run leaves it (the kill is simulated in-process)."""
    from nnfit import devices

    def kill():
        raise SystemExit(137)

    run = tmp_path / "killed"
    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:5")
    monkeypatch.setattr(devices, "kill_self", kill)
    with pytest.raises(SystemExit):
        main(["train", "--samples", "200", "--optimizer", "adam", "--batch-size", "32", "--epochs", "3",
              "--checkpoint-every", "2", "--quiet", "--no-plots", "--out", str(run)])
    monkeypatch.delenv("NNFIT_FAULT")
    return run


def test_truncated_or_corrupted_training_state(killed_run, capsys):
    [tensors] = killed_run.glob("state-*.safetensors")
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[: len(blob) // 2])
    check(capsys, ["resume", str(killed_run)], 2, f"{tensors} does not match the checksum in")
    tensors.write_bytes(blob)
    state = killed_run / "state.json"
    text = state.read_text()
    state.write_text(text[: len(text) // 2])
    check(capsys, ["resume", str(killed_run)], 2, f"training state {state} is not valid JSON")
    state.write_text(text.replace('"format_version": 1', '"format_version": 7', 1))
    check(capsys, ["resume", str(killed_run)], 2, "has format version 7, but this nnfit reads training states of "
                                                  "version 1")


def test_resume_without_a_state(run_dir, tmp_path, capsys):
    check(capsys, ["resume", str(run_dir)], 2, "has no training state to resume (state.json): the run finished")
    check(capsys, ["resume", str(tmp_path / "nope")], 2, "does not exist")


def test_init_from_a_different_architecture(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    check(capsys, ["train", "--init-from", str(run_dir), "--hidden", "8", "--out", str(out)], 2,
          "has a different architecture (they differ in hidden)", out)


def test_bad_checkpoint_every(tmp_path, capsys):
    check(capsys, ["train", "--checkpoint-every", "0", "--out", str(tmp_path / "o")], 2,
          "--checkpoint-every must be a positive integer", tmp_path / "o")


def test_evaluate_rejects_bad_samples_and_seed(run_dir, capsys):
    check(capsys, ["evaluate", str(run_dir), "--samples", "-5"], 2, "--samples must be a positive integer")
    check(capsys, ["evaluate", str(run_dir), "--samples", "0"], 2, "--samples must be a positive integer")
    check(capsys, ["evaluate", str(run_dir), "--samples", "1"], 2, "--samples 1 is too few to score a model")
    check(capsys, ["evaluate", str(run_dir), "--seed", "-1"], 2, "--seed must be 0 or more")


def test_evaluate_with_mismatched_arrays(run_dir):
    import nnfit
    from nnfit.errors import NnfitError

    model = nnfit.load(run_dir)
    with pytest.raises(NnfitError, match="X has 5 rows but y has 4 rows"):
        model.evaluate(X=np.zeros((5, 1)), y=np.zeros(4))
    with pytest.raises(NnfitError, match="needs the true values"):
        model.evaluate(X=np.zeros((5, 1)))


def test_predict_from_a_table_gives_no_warning(run_dir, tmp_path, capsys):
    (tmp_path / "in.csv").write_text("x\n0.1\n0.2\n0.3\n")
    assert main(["predict", str(run_dir), "--data", str(tmp_path / "in.csv")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("x,y_pred")


def test_float64_on_mps_is_refused(tmp_path, capsys):
    check(capsys, ["train", "--dtype", "float64", "--device", "mps", "--out", str(tmp_path / "o")], 2,
          "not supported on mps", tmp_path / "o")


# ---------------------------------------------------------------------------------------------------
# Issue 11, items 6 (decompression, wide headers), 7 (signals), 8 (numbers out of range) and 9 (odd
# arguments). Kept in one section (safety-b) so that it merges cleanly with the run-folder cases above.
# ---------------------------------------------------------------------------------------------------

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from nnfit import devices  # noqa: E402
from nnfit.tables import MAX_COLUMNS  # noqa: E402

TINY = ["--samples", "200", "--test-samples", "200", "--epochs", "2", "--quiet"]

# Runs `nnfit ARGV` in a child process with one function replaced by one that says "BLOCKED" on stderr
# and sleeps: the test sends a signal at that moment, whatever the machine's speed.
_DRIVER = """
import functools, importlib, sys, time
from nnfit.cli import main
target, seconds, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
module_name, _, attr = target.partition(":")
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
@functools.wraps(original)
def blocked(*args, **kwargs):
    print("BLOCKED", file=sys.stderr, flush=True)
    time.sleep(seconds)
    return original(*args, **kwargs)
setattr(owner, name, blocked)
sys.exit(main(argv))
"""


def _signalled(target, argv, signum=signal.SIGTERM, seconds=60.0, cwd=None):
    """(exit code, stderr without the marker) of the CLI signalled while ``target`` runs."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, target, str(seconds), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    watchdog = threading.Timer(180, proc.kill)  # a regression fails here instead of hanging the suite
    watchdog.start()
    try:
        seen = []
        for line in proc.stderr:
            if line.strip() == "BLOCKED":
                proc.send_signal(signum)
                break
            seen.append(line)
        rest = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(seen) + rest


def _one_line(err, code):
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nnfit: "), err
    return lines[0]


def test_sigterm_during_data_loading_exits_143(tmp_path):
    out = tmp_path / "run"
    code, err = _signalled("nnfit.api:build_problem", ["train", *TINY, "--out", out])
    assert code == 143
    assert "SIGTERM while loading the data: stopped; nothing of this run was saved" in _one_line(err, code)
    assert not out.exists()


def test_sigint_during_data_loading_exits_130(tmp_path):
    code, err = _signalled("nnfit.api:build_problem", ["train", *TINY, "--out", tmp_path / "run"], signal.SIGINT)
    assert code == 130 and "SIGINT while loading the data: stopped" in _one_line(err, code)


def test_sigterm_during_final_evaluation_exits_143(tmp_path):
    out = tmp_path / "run"
    code, err = _signalled("nnfit.api:FittedModel.evaluate", ["train", *TINY, "--out", out])
    line = _one_line(err, code)
    assert code == 143 and "SIGTERM while the final evaluation: stopped" in line
    assert f"continue with: nnfit resume {out}" in line
    assert (out / "state.json").exists() and not (out / "model.safetensors").exists()


def test_sigterm_during_plotting_exits_143_with_the_model_saved(tmp_path):
    out = tmp_path / "run"
    code, err = _signalled("nnfit.report:write_plots", ["train", *TINY, "--out", out])
    line = _one_line(err, code)
    assert code == 143 and f"SIGTERM while writing the plots: stopped; the model is saved in {out}" in line
    assert (out / "model.safetensors").exists() and (out / "summary.json").exists()
    assert not (out / "fit.png").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the write in progress was undone


def test_sigterm_during_saving_finishes_the_write_then_exits_143(tmp_path):
    out = tmp_path / "run"
    code, err = _signalled("nnfit.checkpoint:save_weights", ["train", *TINY, "--out", out], seconds=1.0)
    line = _one_line(err, code)
    assert code == 143 and "SIGTERM while saving the run (finished first): stopped" in line
    for name in ("model.safetensors", "model.json", "config.json", "summary.json", "metrics.csv"):
        assert (out / name).exists(), name
    assert main(["evaluate", str(out), "--samples", "100"]) == 0  # the saved run is complete and loads


def test_sigterm_during_evaluate_command_exits_143(run_dir):
    code, err = _signalled("nnfit.api:FittedModel.evaluate", ["evaluate", run_dir])
    assert code == 143 and _one_line(err, code) == "nnfit: SIGTERM: stopped"


def test_npz_that_expands_a_thousandfold_is_refused_before_decompressing(tmp_path, capsys):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, X=np.zeros((10_000_000, 2)), y=np.zeros(10_000_000))  # 1.3 MB -> 240 MB
    check(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "out")], 2,
          "as more is a sign of a decompression bomb", out=tmp_path / "out")


def test_npz_whose_header_claims_more_than_the_member_holds(tmp_path, capsys):
    import zipfile

    header = np.lib.format.header_data_from_array_1_0(np.zeros((10**9, 2)))
    fake = tmp_path / "X.npy"
    with open(fake, "wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        file.write(b"\0" * 64)
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(fake, "X.npy")
        archive.writestr("y.npy", (tmp_path / "X.npy").read_bytes())
    check(capsys, ["train", "--data", str(path), "--out", str(tmp_path / "out")], 2, "the file is damaged")


def test_csv_header_with_a_million_columns_is_refused(tmp_path, capsys):
    path = tmp_path / "wide.csv"
    path.write_text(",".join(f"c{i}" for i in range(1_000_000)) + "\n" + ",".join(["1"] * 1_000_000) + "\n")
    check(capsys, ["train", "--data", str(path), "--target", "c0", "--out", str(tmp_path / "out")], 2,
          f"has 1,000,000 columns; nnfit fits tables of up to {MAX_COLUMNS:,} columns")


def test_repeated_names_among_the_most_columns_allowed_are_found(tmp_path, capsys):
    names = [f"c{i}" for i in range(MAX_COLUMNS - 1)] + ["c7"]  # linear checks: this takes well under a second
    path = tmp_path / "wide.csv"
    path.write_text(",".join(names) + "\n" + ",".join(["1"] * MAX_COLUMNS) + "\n")
    check(capsys, ["train", "--data", str(path), "--target", "c0", "--out", str(tmp_path / "out")], 2,
          "repeated column names: c7")


def test_target_of_1e300_is_refused_with_the_largest_magnitude(tmp_path, capsys):
    check(capsys, ["train", "--formula", "1e300*x", "--domain", "x=0:1", *TINY, "--out", str(tmp_path / "o")], 2,
          "e+299 in 'y'; values beyond 1e+150 cannot be fitted", out=tmp_path / "o")


def test_exp_100x_trains_in_float64_by_itself(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--formula", "exp(100*x)", "--domain", "x=0:1", *TINY, "--out", str(out)]) == 0
    _, err = capsys.readouterr()
    assert "beyond float32's range (values up to 1e+35): training in float64" in err
    summary = json.loads((out / "summary.json").read_text())
    assert all(np.isfinite(v) for v in summary["test"].values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float64"
    assert main(["predict", str(out), "--input", "x=1"]) == 0
    printed = capsys.readouterr().out.splitlines()[1]
    assert np.isfinite(float(printed.split(",")[1]))


def test_values_beyond_float32_with_mixed_precision_are_refused(tmp_path, capsys):
    check(capsys, ["train", "--formula", "exp(100*x)", "--domain", "x=0:1", "--precision", "bf16", *TINY,
                   "--out", str(tmp_path / "o")], 2, "--precision bf16 has no float64 to train in")


def test_nan_final_metric_is_an_error_not_a_success(tmp_path, capsys, monkeypatch):
    from nnfit import api

    monkeypatch.setattr(api, "regression_metrics", lambda pred, true: {"mse": float("nan"), "rmse": 1.0})
    out = tmp_path / "o"
    check(capsys, ["train", *TINY, "--out", str(out)], 2, "the final validation metrics of formula 'x**2 + x' "
          "are not finite (mse nan)")
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("option", ["--threads", "--epochs", "--lr", "--hidden", "--samples", "--batch-size"])
def test_train_option_given_double_dash_as_its_value(option, tmp_path, capsys):
    check(capsys, ["train", f"{option}=--", "--out", str(tmp_path / "o")], 2, f"{option} must be")


def test_predict_input_given_double_dash(run_dir, capsys):
    check(capsys, ["predict", str(run_dir), "--input=--"], 2, "--input '--' must look like NAME=VALUE")


def test_evaluate_samples_given_double_dash(run_dir, capsys):
    check(capsys, ["evaluate", str(run_dir), "--samples=--"], 2, "--samples must be an integer, got '--'")


def test_train_out_under_proc_is_refused(tmp_path, capsys):
    check(capsys, ["train", *TINY, "--out", "/proc/nnfit-test/x"], 2, "could not create the run folder /proc/nnfit-test/x")


def test_export_out_under_proc_is_refused(run_dir, capsys):
    check(capsys, ["export", str(run_dir), "--format", "torchscript", "--out", "/proc/nope/x.pt"], 2,
          "could not create the folder /proc/nope to write x.pt")


def test_formula_with_a_400_digit_integer(tmp_path, capsys):
    check(capsys, ["train", "--formula", "1" * 400 + "*x", "--domain", "x=0:1", "--out", str(tmp_path / "o")], 2,
          "(400 digits) is too large for a floating-point number")


def test_evaluate_with_a_billion_samples_names_the_limit(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(devices, "free_host_memory", lambda: 16 * 1024**3)
    check(capsys, ["evaluate", str(run_dir), "--samples", "1000000000"], 2,
          "more than the 16.0 GB free now; the most that fit is about 268,435,456")


def test_hidden_widths_that_cannot_fit_in_memory(tmp_path, capsys):
    check(capsys, ["train", "--hidden", "100000000,100000000", "--out", str(tmp_path / "o")], 2,
          "makes a network of 10,000,000,400,000,001 parameters")


def test_inspect_into_a_closed_pipe_exits_quietly(run_dir):
    # `nnfit inspect RUN | head -1`: the reader goes away after one line.
    proc = subprocess.run(f"{sys.executable} -m nnfit inspect {run_dir} | head -c 1", shell=True,
                          capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert proc.stdout == "p" and proc.stderr == ""
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m nnfit inspect {run_dir} | head -c 1 >/dev/null; "
                           "exit ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


@pytest.mark.parametrize("argv, phrase", [
    (["train", "--seed", "9" * 30], "--seed must be at most 9223372036854775807"),
    (["train", "--threads", "9" * 30], "--threads must be at most 1024"),
    (["train", "--devices", "9" * 30], "--devices must be at most 1024"),
])
def test_integers_beyond_what_torch_takes(argv, phrase, tmp_path, capsys):
    check(capsys, [*argv, "--out", str(tmp_path / "o")], 2, phrase, out=tmp_path / "o")


def test_evaluate_seed_beyond_64_bits(run_dir, capsys):
    check(capsys, ["evaluate", str(run_dir), "--seed", "9" * 30], 2, "--seed must be 0 or more and at most")


# ==========================================================================================================
# Issue 11, items 1-6 (run folders): an owner and a lock, only regular files, one validating reader.
# Bar: exit 0 with the right result, or exit 2 with one line; no traceback, no hang, no earlier run changed.
# ==========================================================================================================

import contextlib
import errno
import hashlib
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import nnfit
from nnfit import runfolder

SMALL = ["--samples", "200", "--epochs", "3", "--quiet"]


def snapshot(folder):
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def within(seconds=10):
    """A regression that blocks (a FIFO opened for reading) fails here instead of hanging the suite."""
    def timeout(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def plotted_run(tmp_path_factory):
    """x**2 + x with plots: fit.png, loss.png and report.html are in the folder."""
    out = tmp_path_factory.mktemp("plotted") / "good"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    return out


# --- item 1: a run folder has an owner --------------------------------------------------------------------

def test_training_into_an_existing_run_is_refused_and_the_run_is_unchanged(plotted_run, tmp_path, capsys):
    run = _copy(plotted_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    check(capsys, ["train", *SMALL, "--formula", "sin(x)", "--domain", "x=0:3", "--out", str(run)], 2,
          "already holds a run (config.json, fit.png, loss.png, metrics.csv, model.json, model.safetensors "
          "and 2 more) and 1 other file(s) (notes.txt); nnfit never overwrites a run folder silently: pass --overwrite")
    assert snapshot(run) == before


def test_a_folder_of_user_files_is_refused_too(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("x\n1\n")
    check(capsys, ["train", *SMALL, "--out", str(tmp_path / "mine")], 2, "already holds 1 other file(s) (data.csv)")
    with pytest.raises(nnfit.NnfitError, match="pass --overwrite"):
        nnfit.fit(samples=100, epochs=1, quiet=True, out=str(tmp_path / "mine"))


def test_overwrite_replaces_the_run_removes_its_stale_files_and_keeps_user_files(plotted_run, tmp_path, capsys):
    run = _copy(plotted_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "state-mydata.safetensors").write_bytes(b"the user's own file")
    parent = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", *SMALL, "--formula", "2*x + 3", "--domain", "x=0:1", "--no-plots", "--overwrite",
                 "--out", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "nnfit: warning: --overwrite:" in err and "notes.txt, state-mydata.safetensors" in err
    assert "they are kept" in err
    assert {p.name for p in run.iterdir() if not p.name.startswith(".")} == {
        "config.json", "metrics.csv", "model.json", "model.safetensors", "summary.json", "notes.txt",
        "state-mydata.safetensors"}  # the old fit.png, loss.png and report.html are gone
    assert (run / "notes.txt").read_text() == "mine"
    assert f"run folder: {run} (config.json, metrics.csv, model.json, model.safetensors, summary.json)" in out
    assert nnfit.load(run).config.formula == "2*x + 3"
    assert abs(nnfit.load(run).predict(np.array([[0.5]]))[0] - 4.0) < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == parent  # nothing outside the run folder


def test_overwrite_from_python_and_save(tutorial_run, tmp_path):
    model, _ = tutorial_run
    out = tmp_path / "saved"
    model.save(out, plots=False)
    with pytest.raises(nnfit.NnfitError, match="already holds a run"):
        model.save(out, plots=False)
    model.save(out, plots=False, overwrite=True)
    fitted = nnfit.fit(samples=100, epochs=1, quiet=True, plots=False, out=str(out), overwrite=True)
    assert nnfit.load(out).summary["train_seconds"] == fitted.summary["train_seconds"]


def test_disk_full_over_a_good_run_leaves_it_whole(plotted_run, tmp_path, capsys, monkeypatch):
    run = _copy(plotted_run, tmp_path)
    before = snapshot(run)
    good = nnfit.load(run).evaluate()
    real = tempfile.mkstemp

    def full(*args, dir=None, **kwargs):
        if Path(dir).name == runfolder.STAGING:  # the new run's files: the disk fills up as they are written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    check(capsys, ["train", *SMALL, "--formula", "sin(x)", "--domain", "x=0:3", "--hidden", "40,40", "--overwrite",
                   "--out", str(run)], 2, "no space left on the device")
    monkeypatch.setattr(tempfile, "mkstemp", real)
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before  # every file of the good run unchanged
    assert not [k for k in after if k not in before and not k.startswith(("state", ".nnfit.lock"))]
    assert nnfit.load(run).evaluate() == good  # x**2 + x, evaluated against x**2 + x
    assert not (run / runfolder.STAGING).exists()


def test_two_writers_on_one_out_the_second_fails_at_once(tmp_path, capsys):
    run = tmp_path / "run"
    with runfolder.Claim(run):  # the first writer holds the folder
        check(capsys, ["train", *SMALL, "--out", str(run)], 2,
              f"another nnfit process (pid {os.getpid()}) is writing to {run}; wait for it to finish")
        check(capsys, ["train", *SMALL, "--overwrite", "--out", str(run)], 2, "another nnfit process")
    assert main(["train", *SMALL, "--out", str(run)]) == 0  # released with the claim


def test_the_lock_of_a_killed_writer_is_released(tmp_path, capsys):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "NNFIT_FAULT"}
    proc = subprocess.Popen([sys.executable, "-m", "nnfit", "train", "--samples", "400", "--optimizer", "adam",
                             "--batch-size", "32", "--epochs", "500", "--patience", "1000", "--no-plots",
                             "--out", str(run)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("epoch"):
                break
        check(capsys, ["resume", str(run)], 2, "another nnfit process (pid")
        check(capsys, ["train", *SMALL, "--overwrite", "--out", str(run)], 2, f"(pid {proc.pid}) is writing to")
    finally:
        proc.kill()  # a crash: no clean-up runs, the kernel drops the flock
        proc.wait(timeout=30)
    assert main(["train", *SMALL, "--overwrite", "--no-plots", "--out", str(run)]) == 0


def test_default_out_in_the_same_second_gets_its_own_folder(tmp_path, monkeypatch, capsys):
    from datetime import datetime

    from nnfit import cli

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "datetime", Frozen)
    with runfolder.Claim(tmp_path / "runs" / "20260102-030405"):  # a run started in the same second, still running
        assert main(["train", *SMALL, "--no-plots"]) == 0
    assert main(["train", *SMALL, "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20260102-030405", "20260102-030405-2",
                                                                     "20260102-030405-3"]
    assert (tmp_path / "runs" / "20260102-030405-3" / "model.json").exists()
    check(capsys, ["train", "--samples", "0"], 2, "--samples must be a positive integer")
    assert len(list((tmp_path / "runs").iterdir())) == 3  # a refused run leaves no empty folder


def _staged_commit(run, fitted):
    """A writer's commit of ``fitted`` into ``run``, staged and marked but not yet moved into place."""
    stage = run / runfolder.STAGING
    stage.mkdir()
    fitted._write_files(stage)
    names = sorted(p.name for p in stage.iterdir())
    (stage / runfolder.COMPLETE).write_text(json.dumps({"files": names, "keep": []}))


def _commit_on_reading(monkeypatch, name, fitted):
    """Make the run reader race a writer: when it first reads ``name``, ``fitted`` is committed into the folder
    it reads. Returns the list that records the race."""
    read_bytes, raced = runfolder.read_bytes, []

    def racing(where, file, *args, **kwargs):
        if file == name and not raced:
            raced.append(file)
            with runfolder.staged(where) as stage:
                fitted._write_files(stage)
            runfolder.commit(where)
        return read_bytes(where, file, *args, **kwargs)

    monkeypatch.setattr(runfolder, "read_bytes", racing)
    return raced


@pytest.fixture(scope="module")
def other_run():
    """Another run to commit over the tutorial's: another architecture and seed."""
    return nnfit.fit(samples=100, epochs=1, seed=5, hidden=(8,), quiet=True, plots=False)


def test_a_commit_cut_short_is_finished_by_the_next_reader(tutorial_run, tmp_path):
    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    old = nnfit.load(run).summary
    new = nnfit.fit(samples=100, epochs=1, quiet=True, plots=False)
    _staged_commit(run, new)
    stage = run / runfolder.STAGING
    os.replace(stage / "model.safetensors", run / "model.safetensors")  # the crash came after one rename
    loaded = nnfit.load(run)
    assert loaded.summary == json.loads(json.dumps(new.summary)) != old
    assert not stage.exists() and not (run / "fit.png").exists()


def test_a_reader_racing_a_commit_reads_one_whole_run(tutorial_run, other_run, tmp_path, monkeypatch):
    """A commit that lands between a reader's reads of model.json and the weights: the reader saw one
    run's metadata and the next run's weights, and reads again once the commit has finished."""
    from nnfit.errors import NnfitError

    model, folder = tutorial_run
    raced = _commit_on_reading(monkeypatch, runfolder.WEIGHTS, other_run)  # model.json is read: commit now
    loaded = nnfit.load(_copy(folder, tmp_path / "a"))
    assert raced and loaded.summary == json.loads(json.dumps(other_run.summary))
    assert next(loaded.module.parameters()).shape == (8, 1)
    # Without the second read, the reader fails as on a damaged folder.
    raced.clear()
    monkeypatch.setattr(runfolder, "_commit_meanwhile", lambda *a, **k: False)
    with pytest.raises(NnfitError, match="does not match the checksum"):
        nnfit.load(_copy(folder, tmp_path / "b"))
    assert raced


def test_a_reader_that_finished_while_a_commit_ran_reads_again(tutorial_run, other_run, tmp_path, monkeypatch):
    """The commit lands after the weights were read, while config.json is: no read fails, but the reader
    would mix one run's weights with the next run's settings."""
    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    raced = _commit_on_reading(monkeypatch, runfolder.CONFIG, other_run)
    loaded = nnfit.load(run)
    assert raced and loaded.config.seed == 5 and next(loaded.module.parameters()).shape == (8, 1)


def test_a_reader_waits_for_a_commit_in_progress(tutorial_run, other_run, tmp_path):
    import threading
    import time

    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    fd = runfolder._lock(run)  # the writer holds its folder
    _staged_commit(run, other_run)

    def writer():
        time.sleep(0.3)
        runfolder._finish_commit(run)
        runfolder._unlock(run, fd)

    thread = threading.Thread(target=writer)
    thread.start()
    loaded = nnfit.load(run)  # before: "another nnfit process is writing", at once
    thread.join()
    assert next(loaded.module.parameters()).shape == (8, 1)


@pytest.mark.parametrize("plan", [{"files": ["../outside.txt"], "keep": []}, {"files": ["model.json"], "keep": [1]},
                                  {"files": ["notes.txt"], "keep": []}, {"files": [], "keep": ["tb/../.."]}, [1],
                                  {"files": [], "keep": []},  # moves nothing, and would remove the whole run
                                  {"files": ["model.json", "model.safetensors", "metrics.csv"], "keep": []}])
def test_a_commit_marker_that_is_not_nnfits_moves_nothing(tutorial_run, tmp_path, plan):
    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    (tmp_path / "outside.txt").write_text("the user's file")  # run/../outside.txt
    (run / "outside.txt").write_text("planted")  # what run/.nnfit-staging/../outside.txt names
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    stage = run / runfolder.STAGING
    stage.mkdir()
    (stage / "notes.txt").write_text("not nnfit's")
    (stage / "metrics.csv").mkdir()  # a folder where a file is staged
    (stage / runfolder.COMPLETE).write_text(json.dumps(plan))
    loaded = nnfit.load(run)  # the marker is an unfinished write's: dropped, the run is untouched
    assert loaded.summary == json.loads((run / "summary.json").read_text())
    assert (tmp_path / "outside.txt").read_text() == "the user's file"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not stage.exists()


def test_a_staging_folder_that_is_a_link_moves_nothing_in(tutorial_run, tmp_path):
    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "metrics.csv").write_text("not this run's")
    (elsewhere / runfolder.COMPLETE).write_text(json.dumps({"files": ["metrics.csv"], "keep": []}))
    (run / runfolder.STAGING).symlink_to(elsewhere)
    with within(10):
        nnfit.load(run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not os.path.lexists(run / runfolder.STAGING) and (elsewhere / "metrics.csv").exists()


@pytest.mark.parametrize("marker", ["fifo", "link to /dev/zero"])
def test_a_commit_marker_that_is_not_a_file_never_blocks(tutorial_run, tmp_path, marker):
    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    (run / runfolder.STAGING).mkdir()
    path = run / runfolder.STAGING / runfolder.COMPLETE
    os.mkfifo(path) if marker == "fifo" else path.symlink_to("/dev/zero")
    with within(10):
        assert nnfit.load(run).summary["epochs"] == model.summary["epochs"]
    assert not os.path.lexists(run / runfolder.STAGING)


def test_a_column_named_like_a_prediction_is_refused(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("a,y_pred,y\n" + "".join(f"{i / 40},{(i * 7 % 40) / 40},{(i / 40) ** 2}\n" for i in range(40)))
    check(capsys, ["train", "--data", str(table), "--target", "y", "--epochs", "1", "--no-plots", "--out",
                   str(tmp_path / "run")], 2, "the column 'y_pred' has the name predict gives to the predictions of "
                                              "the target 'y', so a prediction would overwrite it; rename that column")


def test_predict_out_where_no_file_can_be_made_is_one_line(run_dir, capsys):
    check(capsys, ["predict", str(run_dir), "--input", "x=0.5", "--out", "/proc/self/x.csv"], 2,
          "could not write /proc/self/x.csv: No such file or directory")


def test_a_config_whose_domain_is_not_the_models_inputs_is_refused(tutorial_run, tmp_path, capsys):
    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["formula"], config["domain"] = "z**2", [["z", 0.0, 1.0]]
    (run / "config.json").write_text(json.dumps(config))
    check(capsys, ["evaluate", str(run)], 2, "config.json: the domain names z, but the model's inputs are x; the run "
                                             "folder was edited")


def test_a_model_json_with_absurd_widths_is_refused_before_anything_is_built(tutorial_run, tmp_path, capsys):
    model, folder = tutorial_run
    run = _copy(folder, tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["architecture"]["hidden"] = [2147483647, 2147483647]
    (run / "model.json").write_text(json.dumps(meta))
    check(capsys, ["predict", str(run), "--input", "x=0.5"], 2, "describes a network of 4,611,686,")


@pytest.mark.parametrize("name", ["p.xlsx", "p.json"])
def test_predict_out_in_a_format_predict_does_not_write_is_refused(run_dir, tmp_path, capsys, name):
    check(capsys, ["predict", str(run_dir), "--input", "x=0.5", "--out", str(tmp_path / name)], 2,
          "but predict writes CSV or Parquet")
    assert not (tmp_path / name).exists()


def test_predict_out_dash_is_standard_output(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(run_dir), "--input", "x=0.5", "--out", "-"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[0] == "x,y_pred" and not (tmp_path / "-").exists()


def test_export_out_with_the_other_formats_suffix_is_refused(run_dir, tmp_path, capsys):
    check(capsys, ["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.pt")], 2,
          "has the suffix of a torchscript file, but --format onnx writes ONNX; name it m.onnx")


def test_hidden_with_an_empty_width_is_refused(tmp_path, capsys):
    check(capsys, ["train", "--hidden", "1,,2", "--out", str(tmp_path / "r")], 2,
          "--hidden must be integers such as 100,100, got '1,,2'", out=tmp_path / "r")


def test_evaluate_target_without_data_is_refused(run_dir, capsys):
    check(capsys, ["evaluate", str(run_dir), "--target", "y"], 2, "--target names the target column of a table "
                                                                   "given with --data, and no --data was given")


def test_predict_input_given_twice_is_refused(run_dir, capsys):
    check(capsys, ["predict", str(run_dir), "--input", "x=1", "--input", "x=2"], 2, "--input x=... is given twice")


def test_resume_of_a_formula_run_with_data_is_refused(tmp_path, capsys, monkeypatch):
    from nnfit import devices

    run = tmp_path / "run"
    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:3")
    monkeypatch.setattr(devices, "kill_self", lambda: (_ for _ in ()).throw(SystemExit(137)))
    with pytest.raises(SystemExit):
        main(["train", "--samples", "100", "--optimizer", "adam", "--batch-size", "8", "--checkpoint-every", "2",
              "--epochs", "3", "--no-plots", "--quiet", "--out", str(run)])
    monkeypatch.delenv("NNFIT_FAULT")
    check(capsys, ["resume", str(run), "--data", str(tmp_path / "t.csv")], 2,
          "learns the formula 'x**2 + x', whose samples are drawn again from its seed; --data is only for a table run")


# --- item 4: only regular files are written ----------------------------------------------------------------

def test_predict_out_to_a_fifo_is_refused(run_dir, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with within(10):
        check(capsys, ["predict", str(run_dir), "--input", "x=0.5", "--out", str(fifo)], 2,
              "is a FIFO (named pipe), not a regular file; nnfit writes only regular files")
    assert stat_kind(fifo) == "fifo"


def stat_kind(path):
    import stat

    mode = os.lstat(path).st_mode
    return "fifo" if stat.S_ISFIFO(mode) else "link" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "?"


def test_predict_and_export_out_to_a_device_are_refused(run_dir, tmp_path, capsys):
    # As root, --out /dev/null itself; here a symlink to the device reaches the same check.
    for name, device in (("null", "/dev/null"), ("full", "/dev/full")):
        (tmp_path / name).symlink_to(device)
    check(capsys, ["predict", str(run_dir), "--input", "x=0.5", "--out", str(tmp_path / "null")], 2,
          "is a character device, not a regular file")
    check(capsys, ["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "full")], 2,
          "is a character device, not a regular file")
    assert stat_kind(tmp_path / "null") == "link" and os.path.realpath(tmp_path / "null") == "/dev/null"
    check(capsys, ["predict", str(run_dir), "--input", "x=0.5", "--out", str(tmp_path)], 2,
          "is a folder, not a regular")


@pytest.mark.parametrize("name", ["model.safetensors", "model.json", "config.json", "summary.json"])
def test_predict_out_into_the_run_folder_is_refused(run_dir, tmp_path, capsys, name):
    run = _copy(run_dir, tmp_path)
    before = snapshot(run)
    check(capsys, ["predict", str(run), "--input", "x=1", "--out", str(run / name)], 2,
          f"is a file of the run folder {run} ({name}); writing it would break the run")
    check(capsys, ["export", str(run), "--format", "torchscript", "--out", str(run / name)], 2, "would break the run")
    assert snapshot(run) == before
    assert main(["export", str(run), "--format", "torchscript", "--out", str(run / "model.pt")]) == 0


# --- item 6: only regular files inside the folder are read, and only up to a cap ------------------------

def test_weights_as_a_symlink_to_dev_zero_are_refused(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").symlink_to("/dev/zero")
    with within(10):
        check(capsys, ["predict", str(run), "--input", "x=1"], 2,
              "model.safetensors is a symbolic link to /dev/zero, outside the run folder")


def test_a_symlink_inside_the_run_folder_is_read(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    (run / "summary.json").rename(run / "kept.json")
    (run / "summary.json").symlink_to("kept.json")
    assert main(["inspect", str(run)]) == 0
    assert "l1.weight" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["predict", "--input", "x=1"], ["inspect"], ["evaluate"],
                                     ["export", "--format", "torchscript"]])
def test_a_fifo_summary_json_is_refused_without_hanging(run_dir, tmp_path, capsys, command):
    run = _copy(run_dir, tmp_path)
    (run / "summary.json").unlink()
    os.mkfifo(run / "summary.json")
    with within(10):
        check(capsys, [command[0], str(run), *command[1:]], 2,
              "summary.json is a FIFO (named pipe), not a regular file; nnfit reads only regular files")


def test_an_oversized_json_file_is_refused_before_it_is_read(run_dir, tmp_path, capsys, monkeypatch):
    run = _copy(run_dir, tmp_path)
    monkeypatch.setattr(runfolder, "JSON_LIMIT", 100)
    size = (run / "model.json").stat().st_size
    check(capsys, ["predict", str(run), "--input", "x=1"], 2,
          f"model.json is {size} bytes, more than the 100 this file can hold; it is not nnfit's file")


# --- item 5: hostile or damaged run-folder JSON ------------------------------------------------------------

def _edit_json(path, change):
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def _set(keys, new):
    def change(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = new
        return d
    return change


def _drop(key):
    def change(d):
        del d[key]
        return d
    return change


CRAFTED_RUNS = [  # (case, file, change, command, phrase)
    ("activation_os_system", "model.json", _set(["architecture", "activation"], "os.system"), "predict",
     "architecture.activation must be one of relu, tanh, silu, gelu, sigmoid, none, got \"os.system\""),
    ("negative_width", "model.json", _set(["architecture", "hidden"], [-5, 100]), "predict",
     "architecture.hidden[0] must be between 1 and 2147483647, got -5"),
    ("string_width", "model.json", _set(["architecture", "hidden"], ["100", 100]), "evaluate",
     "architecture.hidden[0] must be an integer, got \"100\""),
    ("missing_architecture", "model.json", _drop("architecture"), "inspect", "model.json: is missing architecture"),
    ("missing_scaling", "model.json", _drop("scaling"), "predict", "model.json: is missing scaling"),
    ("dtype_dunder_class", "model.json", _set(["dtype"], "__class__"), "predict",
     "dtype must be one of float32, float64, got \"__class__\""),
    ("input_names_a_number", "model.json", _set(["input_names"], 5), "predict", "input_names must be a list, got 5"),
    ("model_json_a_list", "model.json", lambda d: [d], "export", "model.json: must be an object, got [{"),
    ("config_json_a_list", "config.json", lambda d: [], "predict", "config.json: must be an object of settings"),
    ("summary_json_a_list", "summary.json", lambda d: [1], "inspect", "summary.json: must be an object, got [1]"),
    ("width_1e9", "model.json", _set(["architecture", "hidden"], [10**9, 100]), "predict",
     "but the architecture in model.json needs 408,000,000,804 bytes of weights"),
    ("config_setting_from_a_newer_nnfit", "config.json", _set(["warp_drive"], 5), "predict",
     "config.json: setting(s) warp_drive are unknown to this nnfit (written by a newer nnfit? upgrade nnfit"),
    ("config_wrong_type", "config.json", _set(["hidden"], "abc"), "evaluate",
     "config.json field hidden: must be a list, got \"abc\""),
    ("scaling_length", "model.json", _set(["scaling", "x_std"], [1.0, 2.0]), "predict",
     "scaling.x_std has 2 values for 1 input(s)"),
    ("parameter_table_unknown_name", "summary.json", _set(["parameter_table", 0, "name"], "__class__"), "inspect",
     "parameter_table names __class__, which the weights do not hold"),
]


@pytest.mark.parametrize("case, name, change, command, phrase", CRAFTED_RUNS, ids=[c[0] for c in CRAFTED_RUNS])
def test_crafted_run_folder(run_dir, tmp_path, capsys, case, name, change, command, phrase):
    run = _copy(run_dir, tmp_path)
    _edit_json(run / name, change)
    args = {"predict": ["--input", "x=1"], "export": ["--format", "torchscript"]}.get(command, [])
    with within(10):
        check(capsys, [command, str(run), *args], 2, phrase)


def _rewrite_weights(run, change):
    """Change the weights and fix their checksum in model.json, as an attacker would."""
    from safetensors.torch import load_file, save_file

    tensors = change(load_file(run / "model.safetensors"))
    save_file(tensors, run / "model.safetensors")
    _edit_json(run / "model.json", _set(["weights", "sha256"],
                                        hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()))


def test_crafted_run_folder_shape_mismatch_with_its_checksum_fixed(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    _rewrite_weights(run, lambda t: {**t, "l1.weight": torch.zeros(7, 1)})
    check(capsys, ["train", *SMALL, "--init-from", str(run), "--out", str(tmp_path / "o")], 2,
          "model.safetensors: tensor l1.weight has shape (7, 1), but the architecture needs (100, 1)", tmp_path / "o")


def test_crafted_run_folder_i32_weights_with_their_checksum_fixed(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    _rewrite_weights(run, lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    check(capsys, ["predict", str(run), "--input", "x=0.5"], 2,
          "tensor l1.weight has dtype int32, but the run's dtype is float32; the run folder was edited")


def test_crafted_run_folder_extra_tensor(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    _rewrite_weights(run, lambda t: {**t, "evil": torch.zeros(1)})
    check(capsys, ["inspect", str(run)], 2, "does not hold the tensors of the architecture: unexpected evil")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run with a training state mid-epoch (Adam: optimizer tensors), as a kill leaves it."""
    from nnfit import devices

    def kill():
        raise SystemExit(137)

    run = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("NNFIT_FAULT", "kill-at-step:5")
        m.setattr(devices, "kill_self", kill)
        with pytest.raises(SystemExit):
            main(["train", "--samples", "200", "--optimizer", "adam", "--batch-size", "32", "--epochs", "3",
                  "--checkpoint-every", "2", "--quiet", "--no-plots", "--out", str(run)])
    return run


def _first_tensor_ref(info):
    return info["optimizer"]["state"]["__items__"][0][1]  # Adam's state of the first parameter


CRAFTED_STATES = [
    ("epoch_negative", _set(["position", "epoch"], -5), "position.epoch must be 0 or more, got -5"),
    ("optimizer_evil", _set(["optimizer"], "evil"), "optimizer must be an object, got \"evil\""),
    ("missing_tensor_reference", lambda d: (_first_tensor_ref(d).update(exp_avg={"__tensor__": "nope"}), d)[1],
     "refers to tensor(s) \"nope\" that its tensor file does not hold"),
    ("broken_rng_entry", _set(["rng", "numpy"], ["MT19937", 5]), "rng.numpy must have between 4 and 4 entries"),
    ("broken_rng_value", _set(["rng", "numpy", 1], 10**6), "rng.numpy is malformed"),
    ("history_a_number", _set(["history"], 5), "history must be a list, got 5"),
    ("unknown_optimizer_in_config", _set(["config", "optimizer"], "evil"),
     "field config: invalid settings: optimizer must be one of"),
    ("rows_beyond_the_epoch", _set(["position", "rows"], 10**6), "position.rows 1000000 is beyond the epoch's"),
]


@pytest.mark.parametrize("case, change, phrase", CRAFTED_STATES, ids=[c[0] for c in CRAFTED_STATES])
def test_crafted_training_state(stopped_run, tmp_path, capsys, case, change, phrase):
    run = _copy(stopped_run, tmp_path)
    _edit_json(run / "state.json", change)
    before = snapshot(run)
    with within(10):
        check(capsys, ["resume", str(run)], 2, phrase)
    assert snapshot(run) == before


def test_crafted_training_state_with_a_mismatched_model_tensor(stopped_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = _copy(stopped_run, tmp_path)
    info = json.loads((run / "state.json").read_text())
    path = run / info["tensors"]["file"]
    tensors = load_file(path)
    tensors["model/l1.weight"] = torch.zeros(3, 1)
    tensors["best/l1.weight"] = torch.zeros(3, 1)
    save_file(tensors, path)
    _edit_json(run / "state.json", _set(["tensors", "sha256"], hashlib.sha256(path.read_bytes()).hexdigest()))
    check(capsys, ["resume", str(run), "--quiet"], 2,
          "tensor l1.weight has shape (3, 1), but the architecture needs (100, 1)")


def test_a_stopped_run_resumes_after_the_reader_checked_it(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    check(capsys, ["train", *SMALL, "--out", str(run)], 2,
          "already holds a run (state-000002.safetensors, state.json)")
    check(capsys, ["train", *SMALL, "--out", str(run)], 2, f"or continue the stopped run in it with: nnfit resume {run}")
    assert main(["resume", str(run)]) == 0
    assert nnfit.load(run).summary["epochs"] >= 1 and not (run / "state.json").exists()


def test_the_reader_reads_a_pickled_regressor_through_the_same_checks():
    pytest.importorskip("sklearn")
    from nnfit.sklearn import _pack, _unpack

    X = np.linspace(0, 1, 40).reshape(-1, 1)
    model = nnfit.Regressor(hidden=(8,), epochs=2, random_state=0).fit(X, X[:, 0] * 2).model_
    packed = _pack(model)
    assert np.allclose(_unpack(packed).predict(X), model.predict(X))
    with pytest.raises(nnfit.NnfitError, match="the pickled Regressor: architecture.activation must be one of"):
        _unpack({**packed, "architecture": {**packed["architecture"], "activation": "os.system"}})
