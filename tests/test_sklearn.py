"""nnfit.Regressor: scikit-learn's conformance suite, pipelines, search, pickling and partial_fit."""

import io
import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

import nnfit
from nnfit.errors import NnfitError

# The checks exercise the estimator's interface, not its accuracy: a small network keeps the
# suite's ~150 fits fast, and every code path is the same as with the default (100, 100).
SMALL = {"hidden": (16,), "epochs": 10}
# Optional checks that skip by design: array-API input needs SCIPY_ARRAY_API=1 and array-api-strict.
OPTIONAL = {"check_array_api_input"}


def test_passes_sklearn_conformance_suite():
    results = check_estimator(nnfit.Regressor(**SMALL), on_fail=None, on_skip=None)
    failed = [f"{r['check_name']}: {r['exception']!r}" for r in results if r["status"] == "failed"]
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert not failed, "\n".join(failed)
    assert skipped <= OPTIONAL, skipped
    assert sum(r["status"] == "passed" for r in results) > 40


@pytest.fixture(scope="module")
def product():
    """y = a * b + a on [0, 1]^2 as a DataFrame, and a fresh sample to test on."""
    rng = np.random.default_rng(0)

    def sample(n):
        X = pd.DataFrame(rng.uniform(0, 1, size=(n, 2)), columns=["a", "b"])
        return X, X["a"] * X["b"] + X["a"]

    return sample(300), sample(200)


def test_defaults_fit_small_data(product):
    (X, y), (X_test, y_test) = product
    est = nnfit.Regressor(random_state=0).fit(X[:60], y[:60])  # (100, 100) tanh, float64, auto recipe
    assert est.model_.summary["recipe"].startswith("full-batch L-BFGS")
    assert est.score(X_test, y_test) > 0.999


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_dataframe_fit_remembers_names_and_learns(product):
    (X, y), (X_test, y_test) = product
    est = nnfit.Regressor(hidden=(32, 32), epochs=10, random_state=0).fit(X, y)
    assert list(est.feature_names_in_) == ["a", "b"]
    assert est.n_features_in_ == 2 and est.n_outputs_ == 1
    assert est.predict(X_test).shape == (200,)
    assert est.score(X_test, y_test) > 0.999
    with pytest.raises(ValueError, match="feature names"):
        est.predict(X_test[["b", "a"]])
    with pytest.raises(ValueError, match="X has 3 features, but Regressor is expecting 2"):
        est.predict(np.ones((4, 3)))


def test_multi_output_and_2d_y(product):
    (X, y), _ = product
    Y = np.column_stack([y, 2 * y - 1])
    est = nnfit.Regressor(hidden=(32,), epochs=10, random_state=0).fit(X.to_numpy(), Y)
    assert est.predict(X.to_numpy()).shape == (300, 2)
    assert est.score(X.to_numpy(), Y) > 0.99
    column = nnfit.Regressor(hidden=(16,), epochs=3, random_state=0).fit(X, y.to_numpy().reshape(-1, 1))
    assert column.predict(X).shape == (300, 1)  # 2-D y in, 2-D predictions out


def test_grid_search_over_hidden_and_lr_in_a_pipeline(product):
    (X, y), (X_test, y_test) = product
    pipe = make_pipeline(StandardScaler(), nnfit.Regressor(epochs=5, random_state=0))
    grid = {"regressor__hidden": [(8,), (32,)], "regressor__lr": [0.1, 1.0]}
    search = GridSearchCV(pipe, grid, cv=KFold(3, shuffle=True, random_state=0)).fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_params_["regressor__hidden"] in [(8,), (32,)]
    assert search.best_score_ > 0.99
    assert search.score(X_test, y_test) > 0.99


def test_cross_val_score(product):
    (X, y), _ = product
    scores = cross_val_score(nnfit.Regressor(hidden=(16,), epochs=5, random_state=0), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.99


def test_transformed_target_regressor(product):
    (X, y), (X_test, y_test) = product
    model = TransformedTargetRegressor(nnfit.Regressor(hidden=(16,), epochs=5, random_state=0),
                                       func=np.log1p, inverse_func=np.expm1)
    assert model.fit(X, y).score(X_test, y_test) > 0.99


class _Recorder(pickle.Unpickler):
    """Unpickles while noting the module of every class or function the stream refers to."""

    def __init__(self, data):
        super().__init__(io.BytesIO(data))
        self.modules = set()

    def find_class(self, module, name):
        self.modules.add(module)
        return super().find_class(module, name)


def test_clone_and_pickle_carry_no_torch_objects(product):
    (X, y), (X_test, _) = product
    est = nnfit.Regressor(hidden=(8,), epochs=5, random_state=3)
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy is not est
    est.fit(X, y)
    recorder = _Recorder(pickle.dumps(est))
    back = recorder.load()
    assert "nnfit.sklearn" in recorder.modules
    assert not any(m.startswith("torch") for m in recorder.modules), recorder.modules  # safetensors bytes instead
    np.testing.assert_array_equal(back.predict(X_test), est.predict(X_test))
    assert list(back.feature_names_in_) == ["a", "b"]
    assert clone(est).get_params() == est.get_params() and not hasattr(clone(est), "model_")


def test_partial_fit_continues_from_current_weights(product):
    (X, y), (X_test, y_test) = product
    est = nnfit.Regressor(hidden=(32,), optimizer="adam", lr=0.01, epochs=1, batch_size=30, random_state=0)
    est.partial_fit(X[:150], y[:150])
    first = est.score(X_test, y_test)
    scaling = est.model_.scaling
    for _ in range(15):
        est.partial_fit(X, y)
    assert est.model_.scaling == scaling  # the first call's units are kept
    last = est.score(X_test, y_test)
    assert last > 0.99 and last > first, (first, last)

    # With a step too small to move anything the function stays the same: training started from the
    # current weights (a fresh start would give a different function).
    still = pickle.loads(pickle.dumps(est)).set_params(optimizer="sgd", lr=1e-12)
    still.partial_fit(X, y)
    np.testing.assert_allclose(still.predict(X_test), est.predict(X_test), rtol=1e-9)


def test_partial_fit_refuses_other_targets(product):
    (X, y), _ = product
    est = nnfit.Regressor(hidden=(8,), epochs=2, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="y has 2 target column"):
        est.partial_fit(X, np.column_stack([y, y]))


def test_freeze_passes_through_to_training(product):
    (X, y), _ = product
    start = nnfit.Regressor(hidden=(8,), epochs=1, random_state=0).fit(X, y)
    est = nnfit.Regressor(hidden=(8,), epochs=5, freeze="l1", random_state=0).fit(X, y)
    named = dict(est.model_.module.named_parameters())
    assert not named["l1.weight"].requires_grad and named["l2.weight"].requires_grad
    assert est.model_.summary["frozen"].startswith("l1.weight, l1.bias")
    assert start.model_.summary.get("frozen") is None


def test_invalid_settings_raise_nnfit_error(product):
    (X, y), _ = product
    with pytest.raises(NnfitError, match="activation must be one of .*got 'swish'"):
        nnfit.Regressor(activation="swish").fit(X, y)


def test_fit_keeps_the_users_column_and_target_names(product, tmp_path):
    (X, y), _ = product
    est = nnfit.Regressor(hidden=(8,), epochs=3, random_state=0).fit(X[:60], y[:60].rename("target"))
    assert est.model_.input_names == ("a", "b") and est.model_.target_names == ("target",)
    run = est.model_.save(tmp_path / "run", plots=False)
    assert np.allclose(nnfit.load(run).predict(X[:5]), est.predict(X[:5]))
    both = pd.DataFrame({"u": y[:60], "v": 2 * y[:60]})
    assert nnfit.Regressor(hidden=(8,), epochs=2).fit(X[:60], both).model_.target_names == ("u", "v")
    # unusable names fall back: arrays, a target named as an input, non-string columns
    assert nnfit.Regressor(hidden=(8,), epochs=2).fit(X[:60].to_numpy(), y[:60].to_numpy()).model_.input_names \
        == ("x0", "x1")
    assert nnfit.Regressor(hidden=(8,), epochs=2).fit(X[:60], y[:60].rename("a")).model_.target_names == ("y0",)
    assert nnfit.Regressor(hidden=(8,), epochs=2).fit(X[:60], y[:60].rename(0)).model_.target_names == ("y0",)


def test_first_partial_fit_runs_one_epoch(product):
    (X, y), _ = product
    est = nnfit.Regressor(hidden=(8,), random_state=0).partial_fit(X[:60], y[:60])
    assert len(est.history_) == 1
    est.partial_fit(X[60:120], y[60:120])
    assert len(est.history_) == 1 and est.model_.target_names == est.model_.target_names


def test_hidden_as_numpy_floats_trains(product):
    (X, y), _ = product
    est = nnfit.Regressor(hidden=np.array([8.0]), epochs=2).fit(X[:60], y[:60])
    assert est.model_.module.l1.out_features == 8


def test_documented_signature_lists_every_parameter():
    import ast
    import inspect
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "integrations.md").read_text()
    text = re.search(r"`nnfit\.Regressor\((.*?)\)`:", doc, re.S).group(1)
    call = ast.parse(f"f({text})").body[0].value
    documented = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    params = inspect.signature(nnfit.Regressor).parameters
    assert list(documented) == list(params)
    assert documented == {k: p.default for k, p in params.items()}
