"""nnfit sweep: every configuration trained on one set of samples, the best by validation loss kept as a run."""

import io
import json
import re

import numpy as np
import pandas as pd
import pytest

import nnfit
from nnfit import sweeps
from nnfit.cli import main

SMALL = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=200, test_samples=500, epochs=4)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2 x 2 sweep (networks x activations) written to a run folder once: (result, folder)."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    result = nnfit.sweep(**SMALL, hidden="8:16", activation=["tanh", "silu"], out=str(out), quiet=True, plots=False)
    return result, out


def test_table_has_one_row_per_configuration(swept):
    result, out = swept
    grid = {(r["hidden"], r["activation"]) for r in result.rows}
    assert grid == {("8", "tanh"), ("8", "silu"), ("16", "tanh"), ("16", "silu")}
    assert sum(r["selected"] for r in result.rows) == 1
    csv = pd.read_csv(out / "sweep.csv")
    assert len(csv) == 4 and set(csv["config"]) == {1, 2, 3, 4}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["sweep"]["rows"]) == 4 and summary["sweep"]["selected_by"] == "validation loss"
    assert all(np.isfinite(r["test_mse"]) and r["seconds"] > 0 and r["epochs"] >= 1 for r in result.rows)


def test_winner_has_the_lowest_validation_loss_of_the_last_rung(swept):
    result, _ = swept
    last = max(r["rung"] for r in result.rows)
    finalists = [r for r in result.rows if r["rung"] == last]
    winner = next(r for r in result.rows if r["selected"])
    assert winner["rung"] == last
    assert winner["val_loss"] == min(r["val_loss"] for r in finalists)
    assert result.best.config.hidden == tuple(int(w) for w in winner["hidden"].split(","))
    assert result.best.config.activation == winner["activation"]


def test_winner_folder_is_an_ordinary_run(swept, capsys):
    result, out = swept
    loaded = nnfit.load(out)
    X = np.linspace(0, 1, 7)
    assert np.array_equal(loaded.predict(X), result.best.predict(X))
    assert np.allclose(loaded.predict(X), X ** 2 + X, atol=0.05)
    assert loaded.config.hidden == result.best.config.hidden
    assert main(["predict", str(out), "--input", "x=0.5"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert abs(frame["y_pred"][0] - 0.75) < 0.05
    assert main(["evaluate", str(out), "--json", "--samples", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["mse"] < 1e-2
    assert main(["inspect", str(out)]) == 0


def test_samples_are_built_once(monkeypatch):
    from nnfit import data

    calls = []
    original = data.build_problem
    monkeypatch.setattr(data, "build_problem", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = nnfit.sweep(**SMALL, lr=[0.5, 1.0], hidden=(8,), quiet=True, exhaustive=True)
    assert len(calls) == 1
    assert len(result.rows) == 2 and result.path is None


def test_exhaustive_trains_every_configuration_with_the_full_budget():
    result = nnfit.sweep(**SMALL, hidden="8:8,8", quiet=True, exhaustive=True)
    assert [r["rung"] for r in result.rows] == [1, 1]
    assert all("up to 4 epochs" in r["recipe"] for r in result.rows)


def test_successive_halving_budgets():
    assert sweeps._budgets(12, False) == [(12, 1 / 27), (4, 1 / 9), (2, 1 / 3), (1, 1.0)]
    assert sweeps._budgets(2, False) == [(2, 1 / 3), (1, 1.0)]
    assert sweeps._budgets(5, True) == [(5, 1.0)]


def test_width_and_depth_cross():
    configs = sweeps.grid(nnfit.Config(), width="8,16", depth="1,2")
    assert [c.hidden for c in configs] == [(8,), (16,), (8, 8), (16, 16)]
    configs = sweeps.grid(nnfit.Config(), lr="1e-3,3e-3", hidden=[(8, 8), (16,)], activation="tanh")
    assert [(c.lr, c.hidden) for c in configs] == [(1e-3, (8, 8)), (1e-3, (16,)), (3e-3, (8, 8)), (3e-3, (16,))]


def test_cli_sweep_prints_the_table_and_writes_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["sweep", "--samples", "200", "--test-samples", "200", "--epochs", "3", "--hidden", "8:12",
                 "--lr", "0.5,1", "--out", str(out), "--no-plots", "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "sweep of 4 configurations" in stdout and "winner #" in stdout
    rows = re.findall(r"^(\*?) +(\d) +(0\.5|1) +(8|12) +tanh ", stdout, re.MULTILINE)
    assert sorted((lr, hidden) for _, _, lr, hidden in rows) == [("0.5", "12"), ("0.5", "8"), ("1", "12"), ("1", "8")]
    assert [star for star, *_ in rows] == ["*", "", "", ""]  # the winner first
    assert (out / "sweep.csv").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("argv, phrase", [
    (["--lr", ","], "--lr ',' lists no values"),
    (["--lr", "1e-3,,3e-3"], "has an empty value"),
    (["--hidden", "8:"], "has an empty value"),
    (["--hidden", "8:a"], "positive widths"),
    (["--lr", "1e-3,fast"], "'fast', which is not a number"),
    (["--lr", "1e-3,-1"], "learning rates must be positive"),
    (["--lr", "1e-3,1e-3"], "lists 0.001 more than once"),
    (["--activation", "tanh,swish"], "'swish', which is not an activation; choose from relu"),
    (["--lr", "1e-3"], "this sweep has one configuration"),
    (["--hidden", "8", "--width", "8,16"], "--hidden and --width/--depth both"),
    (["--depth", "0,1"], "positive integers"),
    (["--lr", "0.1,1", "--val-split", "0"], "leaves no validation samples"),
    (["--lr", "0.1,1", "--devices", "2"], "a sweep trains in one process"),
    (["--lr", "0.1,1", "--epochs", "2,3"], "--epochs must be an integer"),
])
def test_bad_sweep_lists_are_one_line_and_exit_2(argv, phrase, tmp_path, capsys):
    code = main(["sweep", "--samples", "50", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert phrase in err, err
    assert err.count("\n") == 1 and err.startswith("nnfit: error:")
    assert not (tmp_path / "r").exists()


def test_a_used_folder_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    code = main(["sweep", "--lr", "0.5,1", "--samples", "50", "--out", str(tmp_path / "r")])
    assert code == 2 and "already holds 1 other file(s) (notes.txt)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["notes.txt"]


def test_time_budget_is_shared_out_over_the_rungs():
    result = nnfit.sweep(**SMALL, hidden="8:16:24", quiet=True, time_budget=30)
    # 3 configurations, none the default: rungs of 3 (1/3 of the epochs each) and 1 (all of them), so the first
    # rung's three share half of the 30 s, in proportion to their epochs; the last run gets what is left.
    assert sweeps._budgets(3, False) == [(3, 1 / 3), (1, 1.0)]
    assert 0 < result.best.config.time_budget <= 30
    assert result.best.config.time_budget >= 30 / 2 / 3


def test_learning_rates_of_one_shape_train_stacked(tmp_path):
    result = nnfit.sweep(**{**SMALL, "epochs": 3}, optimizer="adam", lr="3e-3,1e-2", hidden="8:12", quiet=True,
                         exhaustive=True, out=str(tmp_path / "run"))
    assert len(result.rows) == 4
    assert all("stacked with 1 other learning rate" in r["recipe"] for r in result.rows)
    lrs = {(r["hidden"], r["lr"]) for r in result.rows}
    assert lrs == {("8", 3e-3), ("8", 1e-2), ("12", 3e-3), ("12", 1e-2)}
    winner = next(r for r in result.rows if r["selected"])
    assert winner["val_loss"] == min(r["val_loss"] for r in result.rows)
    loaded = nnfit.load(tmp_path / "run")
    assert loaded.members == 1 and loaded.config.lr == winner["lr"]
    assert np.array_equal(loaded.predict([[0.25]]), result.best.predict([[0.25]]))


def test_the_winner_is_trained_as_an_ordinary_run_and_never_loses_to_the_default():
    """The grid lists the default (Adam's auto lr 3e-3, 100,100 tanh): it trains first, in full, exactly as
    nnfit.fit would; the winner beats it or is it, and is itself the full run of its settings."""
    settings = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=200, test_samples=500, epochs=12,
                    optimizer="adam", quiet=True, plots=False)
    default = nnfit.fit(**settings)
    result = nnfit.sweep(**settings, lr="1e-3,3e-3,3e-2", hidden="8:100,100")

    def best_val(fitted):
        return min(row["val_loss"] for row in fitted.history)

    row = next(r for r in result.rows if (r["lr"], r["hidden"]) == (3e-3, "100,100"))
    assert row["val_loss"] == best_val(default)  # the default's run is the default run, not a rung's short one
    assert row["epochs"] == default.summary["epochs"] and row["rung"] == max(r["rung"] for r in result.rows)
    assert "stacked" not in row["recipe"] and row["recipe"] == default.summary["recipe"]
    assert best_val(result.best) <= best_val(default)
    assert result.best.summary["sweep"]["default"] == row["config"]
    # The winner, whichever it is, is the same run as a plain fit of its settings with the same seed.
    c = result.best.config
    alone = nnfit.fit(**settings, lr=c.lr, hidden=c.hidden, activation=c.activation)
    assert result.best.summary["stopped"] == alone.summary["stopped"]
    assert result.best.summary["epochs"] == alone.summary["epochs"] == 12
    assert np.array_equal(result.best.predict(np.linspace(0, 1, 9)), alone.predict(np.linspace(0, 1, 9)))
    assert c.epochs == 12 and c.time_budget is None


def test_a_budget_the_default_run_spends_leaves_the_rest_untrained():
    result = nnfit.sweep(**SMALL, hidden="8:100,100", quiet=True, time_budget=1e-6)
    winner = next(r for r in result.rows if r["selected"])
    assert (winner["hidden"], winner["epochs"]) == ("100,100", 1)  # the deadline comes after one epoch
    other = next(r for r in result.rows if not r["selected"])
    assert other["note"] == "not trained: the time budget was spent" and other["epochs"] == 0
    assert "time budget" in result.best.summary["stopped"]


# Checked before anything trains, reported as a sweep's problem.

CLI = ["sweep", "--formula", "x**2+x", "--domain", "x=0:1", "--samples", "60", "--epochs", "2", "--no-plots"]


def _count_fits(monkeypatch) -> list:
    from nnfit import api

    calls, original = [], api._fit
    monkeypatch.setattr(api, "_fit", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_init_from_of_another_network_is_refused_before_training(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r8"
    nnfit.fit(**{**SMALL, "epochs": 1}, hidden=(8,), out=str(run), quiet=True, plots=False)
    calls = _count_fits(monkeypatch)
    code = main([*CLI, "--hidden", "8:16", "--init-from", str(run), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and calls == [] and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "nothing was trained" in err and "#2 (hidden 16, tanh)" in err and "#1 (" not in err
    assert "sweep only what keeps that network" in err and "Pass --hidden" not in err
    assert not (tmp_path / "s").exists()
    # the same network with learning rates swept starts from it
    result = nnfit.sweep(**SMALL, hidden="8", lr=[1e-3, 3e-3], init_from=str(run), quiet=True)
    assert result.best.summary["init_from"]["run"] == str(run)


def test_a_network_that_cannot_fit_in_memory_is_refused_before_training(monkeypatch, capsys):
    from nnfit import devices

    monkeypatch.setattr(devices, "free_host_memory", lambda: 50 * 2 ** 20)
    calls = _count_fits(monkeypatch)
    code = main([*CLI, "--hidden", "8:4000,4000:10"])
    err = capsys.readouterr().err
    assert code == 2 and calls == [] and len(err.strip().splitlines()) == 1
    assert "#2 (hidden 4000,4000, tanh)" in err and "#1 (" not in err and "#3 (" not in err
    assert "drop those networks from --hidden" in err
    # one shape at three learning rates trains as one stacked model: three networks' memory at once
    monkeypatch.setattr(devices, "free_host_memory", lambda: 100 * 2 ** 20)  # one fits, three do not
    code = main([*CLI, "--hidden", "1000,1000", "--lr", "1e-3,2e-3,3e-3", "--optimizer", "adam"])
    err = capsys.readouterr().err
    assert code == 2 and calls == [] and "train together, stacked (one network, 3 learning rates)" in err
    assert "list fewer learning rates" in err


def test_out_is_checked_as_train_checks_it(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for extra in ([], ["--overwrite"]):  # the same answer with and without --overwrite
        assert main([*CLI, "--hidden", "8:16", "--out", str(afile), *extra]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    run = tmp_path / "run"
    nnfit.fit(**{**SMALL, "epochs": 1}, hidden=(8,), out=str(run), quiet=True, plots=False)
    assert main([*CLI, "--hidden", "8:16", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (config.json, metrics.csv, model.json, model.safetensors, summary.json)" in err
    assert "--overwrite" in err
    assert afile.read_text() == "mine"


def test_a_stop_signal_says_which_configuration_and_that_nothing_was_written(tmp_path, monkeypatch, capsys):
    import signal

    from nnfit import api
    from nnfit.errors import TrainingInterrupted

    original, calls = api._fit, []

    def fit_then_stop(*a, **k):  # the second training (rung 1's second configuration) gets SIGINT
        calls.append(1)
        if len(calls) == 2:
            raise TrainingInterrupted("SIGINT: training stopped at epoch 1 step 3; there is no run folder "
                                      "(out=...), so nothing was saved", 128 + signal.SIGINT)
        return original(*a, **k)

    monkeypatch.setattr(api, "_fit", fit_then_stop)
    out = tmp_path / "swr"
    code = main([*CLI, "--hidden", "8:16", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and not out.exists()
    assert "SIGINT: the sweep stopped in rung 1 of 2, training configuration(s) #2" in err
    assert f"nothing was written to --out {out}" in err and "cannot be resumed" in err
    assert "there is no run folder" not in err


def test_a_time_budget_stop_reports_one_epoch_count_and_the_users_budget(tmp_path):
    out = tmp_path / "swt"
    result = nnfit.sweep(**{**SMALL, "epochs": 30}, hidden="8:16", time_budget=0.001, out=str(out), quiet=True,
                         plots=False)
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    row = next(r for r in result.rows if r["selected"])
    assert config["time_budget"] == 0.001  # what the user gave, not the run's share of it
    assert config["epochs"] == summary["epochs"] == row["epochs"] == len(result.best.history)
    assert re.match(r"its share \(\S+ s\) of the sweep's time budget of 0.001 s reached", summary["stopped"])
    assert f"{summary['epochs']} of 10 epochs" in summary["recipe"]


def test_sweep_csv_is_committed_with_the_model_before_the_plots(tmp_path, monkeypatch):
    from nnfit import report

    def broken(*a, **k):
        raise KeyboardInterrupt  # as a Ctrl-C while the plots are written

    monkeypatch.setattr(report, "write_plots", broken)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        nnfit.sweep(**SMALL, hidden="8:16", out=str(out), quiet=True, plots=True)
    summary = json.loads((out / "summary.json").read_text())
    assert len(pd.read_csv(out / "sweep.csv")) == len(summary["sweep"]["rows"]) == 2
