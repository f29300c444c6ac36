"""``nnfit.Regressor``: nnfit as a scikit-learn estimator, trained by the same code as the CLI.

Pickling is the one place nnfit meets pickle, because scikit-learn requires it of its estimators
(clone, joblib, GridSearchCV with n_jobs). Even then the network travels as safetensors bytes and
JSON, never as a pickled torch object; nnfit's own files never use pickle.
"""

from __future__ import annotations

import json

import numpy as np

try:
    from sklearn.base import BaseEstimator, RegressorMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:
    raise ImportError("nnfit.Regressor needs scikit-learn 1.6 or newer, which is not installed; "
                      "install it with pip install 'nnfit[sklearn]' (from a clone: pip install -e '.[sklearn]')") from exc

from nnfit.config import FIELDS
from nnfit.errors import NnfitError


class Regressor(RegressorMixin, BaseEstimator):
    """A fully connected network fitted by nnfit, with the scikit-learn estimator interface.

    Every argument is the ``nnfit.fit`` setting of the same name; ``random_state`` is nnfit's
    ``seed``. Inputs and targets are standardized inside, so a ``StandardScaler`` in front is not
    needed. Training runs through ``nnfit.fit``'s own loop (``nnfit.train.train``).

    Args:
        hidden: Hidden layer widths.
        activation: ``relu``, ``tanh``, ``silu``, ``gelu``, ``sigmoid`` or ``none``.
        optimizer: ``auto`` (full-batch L-BFGS for small data, Adam otherwise), ``adam``, ``adamw``,
            ``sgd`` or ``lbfgs``.
        lr, epochs, batch_size, weight_decay, schedule, val_split, patience, time_budget, grad_clip:
            As in ``nnfit train --help``; ``None`` picks nnfit's default for the data size.
        dtype: ``float64`` (default, as scikit-learn's estimators compute) or ``float32``
            (faster, especially on a GPU).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        freeze: Parameter-name patterns to keep frozen (nnfit's ``freeze`` setting).
        ensemble: K >= 2 trains K networks as one stacked computation; ``predict`` gives their mean and
            ``predict(X, return_std=True)`` also their standard deviation.
        random_state: An int for reproducible fits, ``None`` for a fresh seed per fit, or a
            ``numpy.random.RandomState``.
        verbose: Print nnfit's training progress.

    Attributes:
        model_: The fitted ``nnfit.FittedModel`` (``model_.save(path)`` writes a run folder).
        n_features_in_: Number of input columns seen in ``fit``.
        feature_names_in_: Column names, when ``X`` was a DataFrame with string column names.
        n_outputs_: Number of targets.
        history_: One dict per epoch of the last ``fit``/``partial_fit``: train and validation
            loss, learning rate, seconds.
    """

    def __init__(self, hidden=(100, 100), activation="tanh", optimizer="auto", lr=None, epochs=None,
                 batch_size=None, weight_decay=0.0, schedule="auto", val_split=0.1, patience=None,
                 time_budget=None, grad_clip=None, dtype="float64", device="auto", freeze=None,
                 ensemble=1, random_state=None, verbose=False):
        self.hidden = hidden
        self.activation = activation
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.val_split = val_split
        self.patience = patience
        self.time_budget = time_budget
        self.grad_clip = grad_clip
        self.dtype = dtype
        self.device = device
        self.freeze = freeze
        self.ensemble = ensemble
        self.random_state = random_state
        self.verbose = verbose

    def fit(self, X, y):
        """Train a fresh network on ``X`` (n, d) and ``y`` (n,) or (n, k). Returns ``self``."""
        names = _target_names(y)
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64,
                             ensure_min_samples=2)
        return self._train(X, y, start=None, target_names=names)

    def partial_fit(self, X, y):
        """Continue training from the current weights for one epoch on ``X``, ``y``.

        ``epochs`` sets how many epochs each call runs when it is given. The input and target
        scaling fitted on the first call is kept, so later batches are learned in the same units.
        On an unfitted estimator this starts a fresh network. Returns ``self``.
        """
        first = not hasattr(self, "model_")
        names = _target_names(y)
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64,
                             ensure_min_samples=2, reset=first)
        if not first and _n_outputs(y) != self.n_outputs_:
            raise ValueError(f"y has {_n_outputs(y)} target column(s), but {type(self).__name__} "
                             f"was fitted with {self.n_outputs_}")
        return self._train(X, y, start=None if first else self.model_, target_names=names, partial=True)

    def predict(self, X, return_std=False):
        """Predictions in the units of ``y``: shape (n,) if ``y`` was 1-D, else (n, k).

        With ``return_std=True`` (``ensemble`` >= 2, as ``GaussianProcessRegressor.predict``), returns
        ``(mean, std)``, std being the members' standard deviation, of the same shape as the mean.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        import torch

        if return_std and self.model_.members == 1:
            raise ValueError("return_std=True needs an ensemble, whose members' spread is the std; this "
                             f"{type(self).__name__} has ensemble={self.ensemble}: set ensemble=K (K >= 2)")
        members = self.model_.member_predictions(torch.from_numpy(np.array(X, dtype=np.float64)))
        mean = (members if members.dim() == 2 else members.mean(dim=0)).numpy()
        shaped = (lambda a: a[:, 0] if self._y_1d else a)  # noqa: E731
        if not return_std:
            return shaped(mean)
        return shaped(mean), shaped(members.std(dim=0).numpy())

    def _train(self, X, y, start, target_names=None, partial=False):
        import pandas as pd

        from nnfit import api, devices
        from nnfit.progress import Reporter

        self._y_1d = y.ndim == 1
        Y = y.reshape(len(y), -1)
        if start is not None:  # partial_fit goes on in the names of its first call
            inputs, targets = list(start.input_names), list(start.target_names)
        else:  # the user's column names where usable, so that model_.save() runs predict on their tables
            plain = [f"x{i}" for i in range(X.shape[1])], [f"y{j}" for j in range(Y.shape[1])]
            inputs = _usable(getattr(self, "feature_names_in_", None), X.shape[1]) or plain[0]
            targets = _usable(target_names, Y.shape[1], taken=inputs) or plain[1]
            if set(targets) & set(inputs):  # the fallback y0.. named as an input column
                inputs, targets = plain
        frame = pd.DataFrame(np.hstack([X, Y]), columns=inputs + targets)
        config = self._config(inputs, targets, partial=partial)
        ctx = devices.init_context(config)
        try:
            fitted = api._fit(config, ctx, frame, start.module if start else None,
                              Reporter(quiet=not self.verbose, verbose=False),
                              scaling=start.scaling if start else None)
        finally:
            devices.cleanup_context(ctx)
        self.model_ = fitted
        self.n_outputs_ = Y.shape[1]
        self.history_ = fitted.history
        return self

    def _config(self, inputs, targets, partial: bool):
        from nnfit.config import Config

        settings = {name: getattr(self, name) for name in (
            "hidden", "activation", "optimizer", "lr", "epochs", "batch_size", "weight_decay", "schedule",
            "val_split", "patience", "time_budget", "grad_clip", "dtype", "device", "ensemble")}
        if partial:
            # One epoch per call by default (the first call too), as scikit-learn's partial_fit; a one-cycle schedule
            # would warm up again from a low rate on every call.
            settings["epochs"] = self.epochs or 1
            if self.schedule == "auto":
                settings["schedule"] = "none"
        if self.freeze is not None:
            if "freeze" not in FIELDS:
                raise NnfitError("freeze= needs a version of nnfit with freezing; this one has none")
            settings["freeze"] = self.freeze
        return Config.from_dict({**settings, "inputs": inputs, "target": targets, "seed": self._seed(),
                                 "quiet": not self.verbose, "plots": False})

    def _seed(self) -> int:
        if isinstance(self.random_state, (int, np.integer)) and not isinstance(self.random_state, bool):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(0, 2**31 - 1))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    # Pickling (clone, joblib): the network as safetensors bytes plus JSON-able metadata.
    def __getstate__(self):
        state = dict(super().__getstate__())
        if "model_" in state:
            state["model_"] = _pack(state["model_"])
        return state

    def __setstate__(self, state):
        state = dict(state)
        if "model_" in state:
            state["model_"] = _unpack(state["model_"])
        super().__setstate__(state)


def _target_names(y):
    """The names of ``y``'s columns: a Series' name, a DataFrame's columns; None for an array."""
    if hasattr(y, "columns"):
        return list(y.columns)
    name = getattr(y, "name", None)
    return None if name is None or not hasattr(y, "index") else [name]


def _usable(names, count: int, taken=()):
    """``names`` as nnfit's column names if they can be: ``count`` distinct non-empty strings without
    surrounding spaces, none of them in ``taken``; else None (the caller falls back to x0.. or y0..)."""
    if names is None:
        return None
    names = list(names)
    if len(names) != count or len(set(names)) != count:
        return None
    if not all(isinstance(n, str) and n and n == n.strip() and "," not in n and n not in taken for n in names):
        return None
    return names


def _n_outputs(y) -> int:
    return 1 if y.ndim == 1 else y.shape[1]


def _pack(fitted) -> dict:
    """A FittedModel as plain data: safetensors bytes for the weights, JSON-able values for the rest."""
    from safetensors.torch import save

    from nnfit.model import architecture

    module = fitted.module
    return {
        "weights": save({k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}),
        "architecture": architecture(module),
        "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
        "device": str(next(module.parameters()).device),
        "trainable": [name for name, p in module.named_parameters() if p.requires_grad],
        "scaling": fitted.scaling.to_dict(),
        "input_names": list(fitted.input_names),
        "target_names": list(fitted.target_names),
        "config": fitted.config.to_dict(),
        # Through JSON: plain values only (the summary holds e.g. torch.__version__, a str subclass).
        "history": json.loads(json.dumps(fitted.history)),
        "summary": json.loads(json.dumps(fitted.summary)),
    }


def _unpack(packed: dict):
    """Rebuild a FittedModel from ``_pack``'s output, through the run-folder reader's checks, on the device
    it was on if that exists here (so a copy predicts exactly as the original), else on the CPU."""
    from nnfit import devices, runfolder
    from nnfit.api import FittedModel
    from nnfit.data import Scaling

    where = "the pickled Regressor"
    if not isinstance(packed, dict) or not isinstance(packed.get("weights"), bytes):
        raise NnfitError(f"{where} holds no nnfit model; pickle a fitted nnfit.Regressor")
    run = runfolder.read_packed(packed, where)
    module = runfolder.build_module(run.weights, run.meta, where=where)
    module = module.to(devices.where_it_was(packed.get("device", "cpu")))
    trainable = set(packed.get("trainable", []))
    for name, p in module.named_parameters():
        p.requires_grad_(name in trainable)
    history = runfolder.checked(runfolder.items(runfolder.mapping(runfolder.anything)), packed.get("history", []),
                                f"{where} field history")
    return FittedModel(module, Scaling.from_dict(run.meta["scaling"]), run.meta["input_names"],
                       run.meta["target_names"], run.config, history, run.summary)
