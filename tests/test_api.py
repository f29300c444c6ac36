import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import nnfit
from nnfit.errors import NnfitError, NnfitWarning


def test_tutorial_exercise_is_learned(tutorial_run):
    model, out = tutorial_run
    s = model.summary
    assert s["test"]["mse"] < 1e-6  # the tutorial's linear network stays near 6e-3
    assert s["validation"]["r2"] > 0.9999
    assert set(s["test"]) == {"mse", "rmse", "mae", "r2", "max_abs_error"}
    x = np.linspace(0, 1, 7)
    assert np.allclose(model.predict(x.reshape(-1, 1)), x**2 + x, atol=2e-3)


def test_run_folder_has_every_file(tutorial_run):
    _, out = tutorial_run
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.json", "metrics.csv", "summary.json",
            "fit.png", "loss.png"} <= names
    meta = json.loads((out / "model.json").read_text())
    assert meta["input_names"] == ["x"] and meta["target_names"] == ["y"]
    assert len(meta["scaling"]["x_mean"]) == 1 and meta["scaling"]["y_std"][0] > 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == ["epoch", "train_loss", "val_loss", "lr", "seconds"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == len(metrics) and summary["train_seconds"] > 0
    assert (out / "fit.png").read_bytes()[:4] == b"\x89PNG"


def test_save_load_predict_gives_identical_numbers(tutorial_run, tmp_path):
    model, out = tutorial_run
    device = str(model.device)  # identical numbers on the device it trained on (cuda:0 where there is a GPU)
    loaded = nnfit.load(out, device=device)
    assert loaded.device == model.device
    X = np.random.default_rng(1).uniform(0, 1, size=(257, 1))
    assert np.array_equal(model.predict(X), loaded.predict(X))
    assert loaded.input_names == ("x",) and loaded.config.formula == "x**2 + x"
    # saving the loaded model again round-trips too
    again = nnfit.load(loaded.save(tmp_path / "again", plots=False), device=device)
    assert np.array_equal(again.predict(X), model.predict(X))
    # the default loads on the CPU: the same numbers up to float rounding of another device's kernels
    on_cpu = nnfit.load(out)
    assert on_cpu.device == torch.device("cpu")
    np.testing.assert_allclose(on_cpu.predict(X), model.predict(X), rtol=0, atol=1e-5)  # float32 rounding


def test_predict_accepts_numpy_dataframe_and_tensor(tutorial_run):
    model, _ = tutorial_run
    x = np.array([0.1, 0.5, 0.9])
    a = model.predict(x.reshape(-1, 1))
    assert a.shape == (3,)
    assert np.array_equal(a, model.predict(pd.DataFrame({"x": x})))
    assert np.array_equal(a, model.predict(torch.tensor(x).reshape(-1, 1)))
    with pytest.raises(NnfitError, match="missing column"):
        model.predict(pd.DataFrame({"z": x}))
    with pytest.raises(NnfitError, match=r"shape \(3, 2\)"):
        model.predict(np.zeros((3, 2)))
    with pytest.raises(NnfitError, match="NaN or infinite values at row 2"):
        model.predict(np.array([[0.1], [np.nan]]))


def test_same_seed_gives_identical_weights():
    kw = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=300, epochs=3, optimizer="adam", quiet=True)
    a, b = nnfit.fit(**kw, seed=3), nnfit.fit(**kw, seed=3)
    c = nnfit.fit(**kw, seed=4)
    for (name, p), q in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.module.state_dict()["l1.weight"], c.module.state_dict()["l1.weight"])


def test_two_input_formula_is_learned():
    model = nnfit.fit(formula="x1 * x2 + x1", domain={"x1": (-1, 1), "x2": (-1, 1)}, samples=2000, quiet=True)
    assert model.summary["test"]["mse"] < 1e-4


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_minibatch_optimizers_learn_a_line(optimizer):
    model = nnfit.fit(formula="2*x + 3", domain={"x": (-1, 1)}, samples=500, optimizer=optimizer,
                      epochs=30, batch_size=32, quiet=True)
    first, last = model.history[0]["val_loss"], min(r["val_loss"] for r in model.history)
    assert last < first / 10
    assert model.summary["test"]["mse"] < 1e-2


@pytest.mark.parametrize("schedule", ["none", "cosine", "onecycle"])
def test_schedules_change_the_learning_rate_as_asked(schedule):
    model = nnfit.fit(formula="x", domain={"x": (0, 1)}, samples=200, optimizer="adam", lr=1e-3, epochs=5,
                      schedule=schedule, patience=100, quiet=True)
    lrs = [r["lr"] for r in model.history]
    if schedule == "none":
        assert lrs == [1e-3] * 5
    else:
        assert lrs[-1] < 1e-3 * 0.5


def test_table_with_several_targets(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, 1500), rng.uniform(-1, 1, 1500)
    frame = pd.DataFrame({"a": a, "b": b, "s": a + b, "p": a * b, "label": ["k"] * 1500})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    with pytest.warns(NnfitWarning, match="label"):
        model = nnfit.fit(data=str(path), target="s,p", quiet=True)
    assert model.input_names == ("a", "b") and model.target_names == ("s", "p")
    pred = model.predict(frame[["a", "b"]])
    assert pred.shape == (1500, 2)
    assert model.summary["validation"]["r2"] > 0.999
    metrics = model.evaluate(data=str(path))
    assert metrics["r2"] > 0.999


def test_dataframe_source_and_evaluate_with_arrays():
    x = np.linspace(-1, 1, 400)
    model = nnfit.fit(data=pd.DataFrame({"x": x, "y": 3 * x - 1}), target="y", quiet=True)
    m = model.evaluate(X=x.reshape(-1, 1), y=3 * x - 1)
    assert m["mse"] < 1e-4


def test_targets_of_shape_n_never_broadcast_against_n_by_1():
    # A (n,) target against (n, 1) predictions would silently become an (n, n) loss.
    model = nnfit.fit(data=pd.DataFrame({"x": np.linspace(0, 1, 300), "y": np.linspace(0, 1, 300) ** 2}),
                      target="y", quiet=True)
    assert model.summary["validation"]["mse"] < 1e-4
    with pytest.raises(ValueError, match="shape"):
        from nnfit.metrics import regression_metrics
        regression_metrics(torch.zeros(5, 1), torch.zeros(5))


def test_linear_network_warns_and_cannot_fit_a_parabola():
    with pytest.warns(NnfitWarning, match="linear"):
        model = nnfit.fit(activation="none", quiet=True)
    assert model.summary["test"]["mse"] > 1e-3  # the tutorial's bug, reproduced on purpose


def test_time_budget_stops_training():
    model = nnfit.fit(formula="sin(8*x)", domain={"x": (0, 1)}, samples=5000, optimizer="adam", epochs=10_000,
                      batch_size=16, time_budget=0.5, quiet=True)
    assert "time budget" in model.summary["stopped"]
    assert model.summary["epochs"] < 10_000
    # One-cycle cut short at a high learning rate: the reason says so, and which epochs would fit.
    epochs = model.summary["epochs"]
    fits = max(1, epochs - 1)  # the last epoch may have been cut short by the budget
    assert model.summary["stopped"].endswith(f"at epoch {epochs} of 10000, before the onecycle schedule had "
                                             f"annealed; for a schedule that fits in the budget, train {fits} "
                                             f"epochs (--epochs {fits})")
    flat = nnfit.fit(formula="sin(8*x)", domain={"x": (0, 1)}, samples=5000, optimizer="adam", epochs=10_000,
                     batch_size=16, time_budget=0.5, schedule="none", quiet=True)
    assert flat.summary["stopped"] == "time budget of 0.5 s reached"


def test_early_stopping_restores_the_best_weights():
    model = nnfit.fit(samples=200, optimizer="adam", lr=0.05, epochs=60, patience=5, schedule="none", quiet=True)
    best = min(r["val_loss"] for r in model.history)
    assert model.summary["best_epoch"] == 1 + [r["val_loss"] for r in model.history].index(best)
    assert len(model.history) <= model.summary["best_epoch"] + 5


def test_an_annealing_schedule_trains_every_epoch_unless_patience_is_given():
    from nnfit.config import Config
    from nnfit.train import choose_recipe

    adam = choose_recipe(Config(optimizer="adam"), 900, 10_000)
    assert (adam.schedule, adam.patience) == ("onecycle", None) and "no early stopping" in adam.describe()
    assert choose_recipe(Config(optimizer="adamw", schedule="cosine"), 900, 10_000).patience is None
    assert choose_recipe(Config(optimizer="adam", schedule="none"), 900, 10_000).patience == 20
    assert choose_recipe(Config(optimizer="sgd"), 900, 10_000).patience == 20
    assert choose_recipe(Config(), 900, 10_000).patience == 10  # L-BFGS
    assert choose_recipe(Config(optimizer="adam", patience=7), 900, 10_000).patience == 7
    # A learning rate far too high for this network: the validation loss is best in the first epochs and
    # stalls while the one-cycle rate is high. Patience 3 stops it; the default runs the whole schedule.
    settings = dict(samples=200, optimizer="adam", lr=0.5, epochs=30, quiet=True, plots=False)
    stopped = nnfit.fit(patience=3, **settings).summary
    assert stopped["stopped"].startswith("no better validation loss") and stopped["epochs"] < 30
    whole = nnfit.fit(**settings).summary
    assert whole["epochs"] == 30 and whole["stopped"].startswith("reached")


class Custom(nn.Module):
    def __init__(self, n_in=1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


def test_custom_module_trains_saves_and_loads(tmp_path):
    model = nnfit.fit(model=Custom(), out=str(tmp_path / "run"), plots=False, quiet=True)
    assert model.summary["test"]["mse"] < 1e-4
    with pytest.raises(NnfitError, match="custom module"):
        nnfit.load(tmp_path / "run")
    loaded = nnfit.load(tmp_path / "run", model=Custom(), device=str(model.device))
    assert np.array_equal(loaded.predict([[0.3]]), model.predict([[0.3]]))
    by_class = nnfit.load(tmp_path / "run", model=Custom, device=str(model.device))  # as fit(model=Custom) accepts
    assert np.array_equal(by_class.predict([[0.3]]), model.predict([[0.3]]))
    with pytest.raises(NnfitError, match="model= must be a torch.nn.Module"):
        nnfit.load(tmp_path / "run", model="Custom")


class Untraceable(Custom):
    def forward(self, x):
        if float(x.sum()) > 1e9:  # data-dependent Python control flow: no trace or script reproduces it
            return self.net(x) * 2
        return self.net(x).numpy().copy() and self.net(x)


def test_a_custom_module_that_cannot_be_exported_is_one_error_line(tmp_path):
    model = nnfit.fit(model=Custom(), samples=100, epochs=1, out=str(tmp_path / "run"), plots=False, quiet=True)
    model.module = Untraceable()
    model.module.load_state_dict(Custom().state_dict())
    with pytest.raises(NnfitError, match="could not be exported to ONNX"):
        model.export("onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_custom_module_with_wrong_input_size_names_both_shapes():
    with pytest.raises(NnfitError, match=r"first layer expects 3 input features, but the data has 1 column \(x\)"):
        nnfit.fit(model=Custom(3), quiet=True)


def test_custom_module_with_wrong_output_shape():
    class Flat(Custom):
        def forward(self, x):
            return self.net(x)[:, 0]

    with pytest.raises(NnfitError, match=r"returns shape \(2,\) .* must return shape \(2, 1\)"):
        nnfit.fit(model=Flat(), quiet=True)


def test_module_that_never_called_super_init():
    class NoSuper(nn.Module):
        def __init__(self):
            self.l1 = nn.Linear(1, 1)

        def forward(self, x):
            return self.l1(x)

    with pytest.raises(NnfitError, match=r"never called super\(\).__init__\(\)"):
        nnfit.fit(model=NoSuper, quiet=True)

    class NoSuperNoLayers(nn.Module):
        def __init__(self):
            self.scale = 2.0

    with pytest.raises(NnfitError, match=r"never called super\(\).__init__\(\)"):
        nnfit.fit(model=NoSuperNoLayers(), quiet=True)


def test_invalid_settings_are_reported_all_at_once():
    with pytest.raises(NnfitError) as info:
        nnfit.fit(lr=-1, batch_size=0, optimizer="nope", quiet=True)
    msg = str(info.value)  # Python speaks keyword names; the CLI renders the same problems as options
    assert "lr must be" in msg and "batch_size must be" in msg and "optimizer must be" in msg and "--" not in msg
    cli = info.value.cli_message()
    assert "--lr must be" in cli and "--batch-size must be" in cli and "--optimizer must be" in cli


def test_unknown_device_lists_the_devices_that_exist():
    with pytest.raises(NnfitError, match="devices here: cpu"):
        nnfit.fit(device="tpu", quiet=True)


def test_predict_accepts_a_frame_that_also_holds_the_target(tutorial_run):
    model, _ = tutorial_run
    frame = pd.DataFrame({"x": [0.2, 0.4], "y": [0.24, 0.56]})
    assert np.array_equal(model.predict(frame), model.predict(frame[["x"]]))


def test_reduced_precision_does_not_pick_lbfgs():
    from nnfit.config import Config
    from nnfit.train import choose_recipe

    assert choose_recipe(Config(), 900, 10_000).optimizer == "lbfgs"
    assert choose_recipe(Config(precision="bf16"), 900, 10_000).optimizer == "adam"
    assert choose_recipe(Config(precision="16-mixed"), 900, 10_000).optimizer == "adam"


def test_predictions_that_are_not_finite_are_flagged(tmp_path):
    import pandas as pd
    import torch

    model = nnfit.fit(samples=100, epochs=1, hidden=(8,), quiet=True, plots=False)
    with torch.no_grad():
        next(model.module.parameters())[0].fill_(float("nan"))  # as in an edited run: one unit's weight
    with pytest.warns(NnfitWarning, match=r"2 of 2 prediction\(s\) are not finite"):
        frame = model.predict_frame(pd.DataFrame({"x": [0.25, 0.75]}))
    assert frame["y_pred"].isna().all()


def test_a_module_instance_is_copied_so_earlier_results_keep_their_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kw = dict(formula="x**2", domain={"x": (0, 1)}, model=net, epochs=2, quiet=True)
    a = nnfit.fit(**kw)
    x = np.linspace(0, 1, 5).reshape(-1, 1)
    first = a.predict(x)
    b = nnfit.fit(**kw, seed=1)
    assert a.module is not b.module and a.module is not net
    assert np.array_equal(a.predict(x), first)  # the second fit left the first result alone
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the instance is untouched


def test_seed_none_draws_a_fresh_seed_and_records_it(tmp_path):
    kw = dict(formula="x**2", domain={"x": (0, 1)}, hidden=(4,), epochs=2, quiet=True)
    a = nnfit.fit(**kw, seed=None, out=str(tmp_path / "run"))
    assert isinstance(a.config.seed, int) and a.summary["seed"] == a.config.seed
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == a.config.seed
    again = nnfit.fit(**kw, seed=a.config.seed)  # the recorded seed reproduces the run
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), again.module.parameters()))
    assert nnfit.Config(seed=None).seed >= 0
    assert len({nnfit.Config(seed=None).seed for _ in range(5)}) > 1


def test_hidden_takes_integral_floats_numpy_ints_and_a_comma_string():
    assert nnfit.Config(hidden=(4.0,)).hidden == (4,)
    assert nnfit.Config(hidden=np.array([8.0, 3])).hidden == (8, 3)
    assert nnfit.Config(hidden=np.int64(5)).hidden == (5,)
    assert nnfit.Config(hidden="8,8").hidden == (8, 8)
    model = nnfit.fit(formula="x**2", domain={"x": (0, 1)}, hidden=(4.0,), epochs=1, quiet=True)
    assert model.module.l1.out_features == 4
    for bad, says in (((4.5,), "positive widths"), ("8,a", "'8,a'"), (("a",), "'a' is not a number")):
        with pytest.raises(NnfitError, match=says):
            nnfit.Config(hidden=bad)


def test_predict_frame_refuses_bad_tables_with_one_error(tutorial_run, tmp_path):
    model, _ = tutorial_run
    with pytest.raises(NnfitError, match="missing input column"):
        model.predict_frame(pd.DataFrame({"z": [0.5]}))
    with pytest.raises(NnfitError, match="DataFrame"):
        model.predict_frame(np.array([[0.5]]))
    out = tmp_path / "P.PARQUET"
    model.predict_frame(pd.DataFrame({"x": [0.25, 0.5]}), out=out)
    assert out.read_bytes()[:4] == b"PAR1"
    assert list(pd.read_parquet(out).columns) == ["x", "y_pred"]


def test_a_dataframe_with_integer_column_labels_fits_and_predicts():
    rng = np.random.default_rng(0)
    d = pd.DataFrame(rng.uniform(0, 1, size=(60, 3)))
    d[2] = d[0] + d[1]
    model = nnfit.fit(data=d, target=2, hidden=(4,), epochs=2, quiet=True)
    assert model.input_names == ("0", "1") and model.target_names == ("2",)
    assert np.array_equal(model.predict(d[[0, 1]]), model.predict(d[[0, 1]].to_numpy()))
    with pytest.raises(NnfitError, match="missing column"):
        model.predict(d[[0]])


def test_a_module_that_cannot_be_copied_is_one_error_naming_the_way_out():
    import threading

    class HoldsALock(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.lock = nn.Linear(1, 1), threading.Lock()

        def forward(self, x):
            return self.l1(x)

    with pytest.raises(NnfitError, match=r"could not be copied .*model=HoldsALock or model=lambda"):
        nnfit.fit(model=HoldsALock(), epochs=1, quiet=True)
