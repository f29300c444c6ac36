"""nnfit export: ONNX and TorchScript files that match `nnfit predict` in original units, any batch size."""

import json
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

import nnfit
from nnfit.cli import main
from nnfit.errors import NnfitError
from nnfit.export import export

BATCHES = (1, 7, 256, 1000)


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """A table run with two inputs and two targets, whose outputs stay far from zero on [1, 2]^2."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.uniform(1, 2, size=(400, 2)), columns=["a", "b"])
    df["sum"] = df.a + df.b
    df["prod"] = df.a * df.b + 1
    out = tmp_path_factory.mktemp("export") / "run"
    nnfit.fit(data=df, target=["sum", "prod"], hidden=(16, 16), epochs=3, out=str(out), quiet=True, plots=False)
    return out, (1.0, 2.0)


@pytest.fixture(params=["tutorial", "two_by_two"])
def run(request, tutorial_run, two_by_two):
    if request.param == "tutorial":
        return tutorial_run[1], (0.1, 1.0)  # y = x**2 + x stays above 0.1 here: relative errors are meaningful
    return two_by_two


def nnfit_predict(run_dir, X, tmp_path):
    model = nnfit.load(run_dir)
    pd.DataFrame(X, columns=model.input_names).to_csv(tmp_path / "in.csv", index=False)
    assert main(["predict", str(run_dir), "--data", str(tmp_path / "in.csv"), "--out", str(tmp_path / "p.csv"),
                 "--overwrite"]) == 0  # each batch size predicts into the same file
    return pd.read_csv(tmp_path / "p.csv")[[f"{t}_pred" for t in model.target_names]].to_numpy()


def random_inputs(run_dir, n, bounds, seed):
    d = len(nnfit.load(run_dir).input_names)
    return np.random.default_rng(seed).uniform(*bounds, size=(n, d))


def test_onnx_matches_nnfit_predict_at_every_batch_size(run, tmp_path, capsys):
    run_dir, bounds = run
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in BATCHES:
        X = random_inputs(run_dir, n, bounds, seed=n)
        got = session.run(["y"], {"x": X.astype(np.float32)})[0]
        np.testing.assert_allclose(got, nnfit_predict(run_dir, X, tmp_path), rtol=1e-5, atol=0)


def test_torchscript_matches_nnfit_predict_at_every_batch_size(run, tmp_path):
    run_dir, bounds = run
    assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    extra = {"nnfit.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    meta = json.loads(extra["nnfit.json"])
    assert meta["input_names"] == list(nnfit.load(run_dir).input_names)
    for n in BATCHES:
        X = random_inputs(run_dir, n, bounds, seed=100 + n)
        with torch.no_grad():
            got = scripted(torch.from_numpy(X).float()).double().numpy()
        np.testing.assert_allclose(got, nnfit_predict(run_dir, X, tmp_path), rtol=1e-5, atol=0)


def test_onnx_graph_has_dynamic_batch_and_names(two_by_two):
    run_dir, _ = two_by_two
    path = export(nnfit.load(run_dir), "onnx")  # default: RUN/model.onnx
    assert path == run_dir / "model.onnx"
    model = onnx.load(str(path))
    x, y = model.graph.input[0], model.graph.output[0]
    assert x.name == "x" and y.name == "y"
    assert x.type.tensor_type.shape.dim[0].dim_param == "batch"  # symbolic: any batch size
    assert [d.dim_value for d in x.type.tensor_type.shape.dim[1:]] == [2]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["input_names"]) == ["a", "b"]
    assert json.loads(props["target_names"]) == ["sum", "prod"]


def test_export_errors(two_by_two, tmp_path, monkeypatch, capsys):
    run_dir, _ = two_by_two
    model = nnfit.load(run_dir)
    with pytest.raises(NnfitError, match="--format must be one of onnx, torchscript, got 'tflite'"):
        export(model, "tflite", tmp_path / "m")
    model.path = None
    with pytest.raises(NnfitError, match="no run folder; give the file to write"):
        export(model, "torchscript")
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'nnfit[export]'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
