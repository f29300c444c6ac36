"""What an ensemble shows its user: mean and spread in predict, evaluate, plots and ONNX."""

import torch

from nnfit.metrics import spread_metrics


def test_spread_metrics_known_answers():
    true = torch.zeros(4, 1, dtype=torch.float64)
    # Members whose mean errs by 0.1, 0.2, 0.3, 0.4 and whose std grows with the error: a perfect ranking.
    offsets = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).reshape(4, 1)
    spreads = torch.tensor([0.01, 0.2, 0.5, 0.1], dtype=torch.float64).reshape(4, 1)
    members = torch.stack([offsets - spreads, offsets + spreads])  # mean = offsets, std = spreads * sqrt(2)
    m = spread_metrics(members, true)
    std = spreads * 2 ** 0.5
    assert abs(m["mean_std"] - float(std.mean())) < 1e-12
    # |error| ranks 0,1,2,3; std ranks 0,2,3,1: Spearman 1 - 6 * (0 + 1 + 1 + 4) / (4 * 15) = 0.4
    assert abs(m["spearman"] - 0.4) < 1e-12
    # within 2 std: 0.1 <= 0.028? no; 0.2 <= 0.566 yes; 0.3 <= 1.41 yes; 0.4 <= 0.283 no
    assert m["coverage_2sigma"] == 0.5


def test_spread_metrics_ties_share_ranks():
    true = torch.zeros(3, 1)
    members = torch.stack([torch.tensor([[1.0], [1.0], [2.0]]) - 1, torch.tensor([[1.0], [1.0], [2.0]]) + 1])
    m = spread_metrics(members, true)  # |error| 1, 1, 2 with equal std: no relation, not a crash
    assert m["spearman"] == 0.0


def test_ensemble_metrics_mean_members_and_median():
    from nnfit.metrics import ensemble_metrics

    true = torch.zeros(2, 1, dtype=torch.float64)
    members = torch.tensor([[[1.0], [1.0]], [[-1.0], [-1.0]], [[3.0], [3.0]]], dtype=torch.float64)
    m = ensemble_metrics(members, true)
    assert [x["mse"] for x in m["members"]] == [1.0, 1.0, 9.0]
    assert m["median_member_mse"] == 1.0
    assert m["mean"]["mse"] == 1.0  # the mean is 1 everywhere


# An ensemble trained once for the tests below.

import io  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import nnfit  # noqa: E402
from nnfit.cli import main  # noqa: E402
from nnfit.errors import NnfitError  # noqa: E402


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "run"
    model = nnfit.fit(formula="sin(3*x)*exp(-x)", domain={"x": (0, 3)}, samples=300, test_samples=500,
                      hidden=(16, 16), epochs=15, ensemble=4, out=str(out), quiet=True)
    return model, out


def test_the_band_is_wider_outside_the_domain(ensemble_run):
    model, _ = ensemble_run
    _, inside = model.predict(np.linspace(0, 3, 200), return_std=True)
    _, outside = model.predict(np.linspace(3.2, 4, 50), return_std=True)
    assert inside.shape == (200,) and np.all(inside >= 0)
    assert outside.mean() >= 5 * inside.mean()


def test_predict_cli_gives_mean_and_std_columns(ensemble_run, capsys):
    model, out = ensemble_run
    assert main(["predict", str(out), "--input", "x=0.5,3.8", "--std"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(frame.columns) == ["x", "y_pred", "y_std"]
    mean, std = model.predict(np.array([0.5, 3.8]), return_std=True)
    assert np.allclose(frame["y_pred"], mean, rtol=1e-6) and np.allclose(frame["y_std"], std, rtol=1e-6)
    assert frame["y_std"][1] > frame["y_std"][0]


def test_predict_std_on_a_single_network_exits_2(tutorial_run, capsys):
    _, out = tutorial_run
    assert main(["predict", str(out), "--input", "x=0.5", "--std"]) == 2
    err = capsys.readouterr().err
    assert "is a single network, so there is no spread to give" in err and err.count("\n") == 1
    with pytest.raises(NnfitError, match="single network"):
        tutorial_run[0].evaluate(members=True)


def test_evaluate_reports_mean_members_and_spread(ensemble_run, capsys):
    _, out = ensemble_run
    assert main(["evaluate", str(out), "--json", "--samples", "400"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert len(metrics["members"]) == 4
    assert metrics["mean"]["mse"] <= metrics["median_member_mse"]
    assert -1 <= metrics["spread"]["spearman"] <= 1 and 0 <= metrics["spread"]["coverage_2sigma"] <= 1
    assert main(["evaluate", str(out), "--samples", "400"]) == 0
    text = capsys.readouterr().out
    assert "4 members, MSE each" in text and "Spearman" in text and "noiseless smooth fit" in text


def test_onnx_gives_mean_and_std(ensemble_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, _ = ensemble_run
    from nnfit.export import export

    path = export(model, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["y", "y_std"]
    X = np.linspace(-0.5, 3.5, 37).reshape(-1, 1)
    y, y_std = session.run(None, {"x": X.astype(np.float32)})
    mean, std = model.predict(X, return_std=True)
    assert np.allclose(y[:, 0], mean, atol=1e-5) and np.allclose(y_std[:, 0], std, atol=1e-5)


def test_export_says_an_ensemble_has_two_outputs(ensemble_run, tmp_path, capsys):
    pytest.importorskip("onnx")
    _, out = ensemble_run
    assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    said = capsys.readouterr().out
    assert "outputs y, the 4 members' mean, and y_std, their standard deviation" in said, said


def test_fit_plot_draws_the_band(ensemble_run):
    from nnfit.report import fit_figure

    model, out = ensemble_run
    fig = fit_figure(model)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "±2σ of 4 members" in labels
    assert (out / "fit.png").exists() and (out / "report.html").exists()


def test_sklearn_return_std():
    X = np.random.default_rng(0).uniform(0, 1, (120, 1))
    reg = nnfit.Regressor(hidden=(8,), epochs=4, ensemble=3, random_state=0).fit(X, X[:, 0] ** 2)
    mean, std = reg.predict(np.array([[0.5], [3.0]]), return_std=True)
    assert mean.shape == std.shape == (2,)
    assert std[1] > std[0]
    assert np.array_equal(reg.predict(np.array([[0.5], [3.0]])), mean)
    with pytest.raises(ValueError, match="return_std=True needs an ensemble"):
        nnfit.Regressor(hidden=(8,), epochs=2, random_state=0).fit(X, X[:, 0]).predict(X, return_std=True)
