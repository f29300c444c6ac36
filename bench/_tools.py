"""One training function per tool, all with the same contract, for bench/peers.py and bench/core.py.

``train_<tool>(Xtr, ytr, Xte, yte, budget, stop_mse=None)`` trains on the training arrays for at most
``budget`` seconds of training time, measures the test MSE (original units) after every epoch with the
clock paused, and returns ``{"trace": [(seconds, mse), ...], "final_mse", "seconds", "epochs"}``.
Training stops at the end of the epoch in which the budget ran out, or the test MSE reached ``stop_mse``.
Every peer gets standardized inputs and targets and the tutorial's recipe (Adam, lr 1e-3, batch 32).
"""

from __future__ import annotations

import warnings

import numpy as np

from _common import ACTIVATION, HIDDEN, TUTORIAL, Clock, Standardizer


def _mse(pred, y) -> float:
    return float(np.mean((np.asarray(pred, np.float64).reshape(y.shape) - y) ** 2))


def _torch_mlp(n_in: int, n_out: int = 1):
    from torch import nn

    act = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}[ACTIVATION]
    widths = [n_in, *HIDDEN]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], n_out))


def _torch_eval(net, scale, Xte, yte) -> float:
    import torch

    with torch.inference_mode():
        pred = net(torch.from_numpy(scale.x(Xte))).numpy()
    return _mse(scale.unscale(pred), yte)


def _result(trace, final_mse, clock, epochs):
    return {"trace": trace, "final_mse": final_mse, "seconds": clock.spent, "epochs": epochs}


def train_nnfit(Xtr, ytr, Xte, yte, budget, stop_mse=None, **settings):
    """nnfit's default recipe through the public API; the bench only watches each epoch."""
    import pandas as pd
    import torch

    import nnfit
    from nnfit.data import Scaling, split_indices
    from nnfit.model import MLP
    from nnfit.progress import Reporter

    cols = [f"x{i}" for i in range(Xtr.shape[1])]
    frame = pd.DataFrame(np.column_stack([Xtr, ytr]), columns=[*cols, "y"])
    config = nnfit.Config(data=None, target=("y",), hidden=HIDDEN, activation=ACTIVATION, quiet=True, plots=False,
                          time_budget=budget, **settings)
    # The same split and scaling nnfit computes inside fit(), so the watcher can test in original units.
    train_idx, _ = split_indices(len(Xtr), config.val_split, config.seed)
    scaling = Scaling.fit(torch.from_numpy(Xtr[train_idx.numpy()]), torch.from_numpy(ytr[train_idx.numpy()]))
    dtype = getattr(torch, config.dtype)
    Xte_s = scaling.scale_x(torch.from_numpy(Xte)).to(dtype)
    torch.manual_seed(config.seed)
    module = MLP(Xtr.shape[1], 1, HIDDEN, ACTIVATION)
    trace, clock = [], Clock()

    class Watcher(Reporter):
        def start(self, recipe, n_train, n_val):
            super().start(recipe, n_train, n_val)
            self.recipe = recipe.describe()
            clock.resume()

        def epoch(self, row, improved):
            clock.pause()
            device = next(module.parameters()).device  # nnfit placed the module: cuda:0 with device auto on a GPU
            with torch.inference_mode():
                pred = scaling.unscale_y(module(Xte_s.to(device)).double().cpu()).numpy()
            trace.append((clock.spent, _mse(pred, yte)))
            clock.resume()

        def finish(self, result):
            clock.pause()

    watcher = Watcher(quiet=True)
    # A factory, not the instance: fit trains a copy of an instance, and the watcher must see the trained module.
    fitted = nnfit.fit(data=frame, target="y", model=lambda: module, config=config, reporter=watcher)
    out = _result(trace, _mse(fitted.predict(Xte), yte), clock, len(trace))
    out["recipe"] = watcher.recipe
    return out


def train_loop(Xtr, ytr, Xte, yte, budget, stop_mse=None):
    """The tutorial's way: a per-sample Dataset, a DataLoader, Adam."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    class Samples(Dataset):
        def __init__(self, X, y):
            self.X, self.y = torch.from_numpy(X), torch.from_numpy(y)

        def __len__(self):
            return len(self.X)

        def __getitem__(self, i):
            return self.X[i], self.y[i]

    scale = Standardizer(Xtr, ytr)
    torch.manual_seed(0)
    net = _torch_mlp(Xtr.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=TUTORIAL["lr"])
    loader = DataLoader(Samples(scale.x(Xtr), scale.y(ytr)), batch_size=TUTORIAL["batch_size"], shuffle=True)
    trace, clock = [], Clock()
    while True:
        for xb, yb in loader:
            loss = F.mse_loss(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        clock.pause()
        trace.append((clock.spent, _torch_eval(net, scale, Xte, yte)))
        if clock.spent >= budget or (stop_mse and trace[-1][1] <= stop_mse):
            return _result(trace, trace[-1][1], clock, len(trace))
        clock.resume()


def train_lbfgs_loop(Xtr, ytr, Xte, yte, budget, stop_mse=None):
    """Reference, not a peer: the recipe nnfit picks for small data, written by hand (full-batch L-BFGS)."""
    import torch
    import torch.nn.functional as F

    scale = Standardizer(Xtr, ytr)
    torch.manual_seed(0)
    net = _torch_mlp(Xtr.shape[1])
    X, y = torch.from_numpy(scale.x(Xtr)), torch.from_numpy(scale.y(ytr))
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=20, history_size=50, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(net(X), y)
        loss.backward()
        return loss

    trace, clock = [], Clock()
    while True:
        opt.step(closure)
        clock.pause()
        trace.append((clock.spent, _torch_eval(net, scale, Xte, yte)))
        if clock.spent >= budget or (stop_mse and trace[-1][1] <= stop_mse):
            return _result(trace, trace[-1][1], clock, len(trace))
        clock.resume()


def train_lightning(Xtr, ytr, Xte, yte, budget, stop_mse=None):
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")  # the num_workers advice, printed once per fit
    scale = Standardizer(Xtr, ytr)
    torch.manual_seed(0)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _torch_mlp(Xtr.shape[1])

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return F.mse_loss(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=TUTORIAL["lr"])

    trace, clock = [], Clock()

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.resume()

        def on_train_epoch_end(self, trainer, pl_module):
            clock.pause()
            trace.append((clock.spent, _torch_eval(pl_module.net, scale, Xte, yte)))
            if clock.spent >= budget or (stop_mse and trace[-1][1] <= stop_mse):
                trainer.should_stop = True
            clock.resume()

    clock.pause()
    module = Module()
    loader = DataLoader(TensorDataset(torch.from_numpy(scale.x(Xtr)), torch.from_numpy(scale.y(ytr))),
                        batch_size=TUTORIAL["batch_size"], shuffle=True)
    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()])
    trainer.fit(module, loader)
    clock.pause() if clock._since is not None else None
    return _result(trace, trace[-1][1], clock, len(trace))


def train_skorch(Xtr, ytr, Xte, yte, budget, stop_mse=None):
    import torch
    from skorch import NeuralNetRegressor

    scale = Standardizer(Xtr, ytr)
    torch.manual_seed(0)
    net = NeuralNetRegressor(_torch_mlp(Xtr.shape[1]), optimizer=torch.optim.Adam, lr=TUTORIAL["lr"],
                             batch_size=TUTORIAL["batch_size"], max_epochs=1, train_split=None, verbose=0)
    X, y, Xt = scale.x(Xtr), scale.y(ytr), scale.x(Xte)
    net.initialize()
    trace, clock = [], Clock()
    while True:
        net.partial_fit(X, y)
        clock.pause()
        trace.append((clock.spent, _mse(scale.unscale(net.predict(Xt)), yte)))
        if clock.spent >= budget or (stop_mse and trace[-1][1] <= stop_mse):
            return _result(trace, trace[-1][1], clock, len(trace))
        clock.resume()


def train_sklearn(Xtr, ytr, Xte, yte, budget, stop_mse=None):
    from sklearn.neural_network import MLPRegressor

    scale = Standardizer(Xtr, ytr)
    net = MLPRegressor(hidden_layer_sizes=HIDDEN, activation=ACTIVATION, solver="adam",
                       learning_rate_init=TUTORIAL["lr"], batch_size=TUTORIAL["batch_size"], random_state=0)
    X, y, Xt = scale.x(Xtr), scale.y(ytr).ravel(), scale.x(Xte)
    trace, clock = [], Clock()
    while True:
        net.partial_fit(X, y)
        clock.pause()
        trace.append((clock.spent, _mse(scale.unscale(net.predict(Xt)), yte)))
        if clock.spent >= budget or (stop_mse and trace[-1][1] <= stop_mse):
            return _result(trace, trace[-1][1], clock, len(trace))
        clock.resume()


# tool -> (trainer, modules it imports, a peer? (the reference row is not))
TOOLS = {
    "nnfit": (train_nnfit, ["torch", "nnfit.api"], False),
    "loop": (train_loop, ["torch"], True),
    "lightning": (train_lightning, ["torch", "lightning"], True),
    "skorch": (train_skorch, ["torch", "skorch"], True),
    "sklearn": (train_sklearn, ["sklearn.neural_network"], True),
    "lbfgs-loop": (train_lbfgs_loop, ["torch"], False),
}
LABELS = {
    "nnfit": "nnfit (default recipe)",
    "loop": "PyTorch loop (Dataset + DataLoader, Adam)",
    "lightning": "Lightning (Adam)",
    "skorch": "skorch (Adam)",
    "sklearn": "scikit-learn MLPRegressor (adam)",
    "lbfgs-loop": "reference: hand-written full-batch L-BFGS",
}
