"""The training loop: one function to read top to bottom, with helpers for a step, an epoch and an evaluation.

Data lives as tensors on the training device. Each epoch draws a permutation,
gathers the data once in that order, and batches are contiguous slices of it.
Losses stay on the device as detached tensors and are read once per epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nnfit.errors import NnfitError

LBFGS_ITERATIONS_PER_EPOCH = 20
LBFGS_MAX_WORK = 5e9  # training rows x parameters up to which full-batch L-BFGS wins (bench/core.py)
DEFAULT_STEPS = 20_000  # Adam/SGD steps when --epochs is not given


@dataclass
class TrainData:
    """Standardized training and validation tensors, already on the training device."""

    X_train: torch.Tensor
    Y_train: torch.Tensor
    X_val: torch.Tensor
    Y_val: torch.Tensor


@dataclass(frozen=True)
class Recipe:
    """The optimizer, schedule and sizes a run actually uses, after the config's 'auto' choices."""

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    schedule: str
    patience: int

    def describe(self) -> str:
        if self.optimizer == "lbfgs":
            return (f"full-batch L-BFGS (lr {self.lr:g}, {LBFGS_ITERATIONS_PER_EPOCH} iterations per epoch, "
                    f"up to {self.epochs} epochs, patience {self.patience})")
        return (f"{self.optimizer} lr {self.lr:g}, batch {self.batch_size}, schedule {self.schedule}, "
                f"up to {self.epochs} epochs, patience {self.patience}")


def choose_recipe(config, n_train: int, n_params: int) -> Recipe:
    """Fill in every 'auto' setting. Small problems get full-batch L-BFGS, which reaches a far
    lower error than any minibatch method on smooth low-dimensional functions (bench/core.py)."""
    optimizer = config.optimizer
    if optimizer == "auto":
        optimizer = "lbfgs" if n_train * n_params <= LBFGS_MAX_WORK else "adam"
    if optimizer == "lbfgs":
        return Recipe("lbfgs", config.lr or 1.0, n_train, config.epochs or 200, "none", config.patience or 10)
    lr = config.lr or (0.01 if optimizer == "sgd" else 3e-3)
    batch = config.batch_size or int(min(4096, max(32, 2 ** round(math.log2(max(n_train, 1) / 64)))))
    batch = min(batch, n_train)
    steps_per_epoch = math.ceil(n_train / batch)
    epochs = config.epochs or max(10, min(2000, math.ceil(DEFAULT_STEPS / steps_per_epoch)))
    schedule = config.schedule if config.schedule != "auto" else ("onecycle" if optimizer in ("adam", "adamw") else "none")
    return Recipe(optimizer, lr, batch, epochs, schedule, config.patience or 20)


def make_optimizer(params, recipe: Recipe, config) -> torch.optim.Optimizer:
    """The optimizer gets trainable parameters only."""
    params = [p for p in params if p.requires_grad]
    if recipe.optimizer == "lbfgs":
        return torch.optim.LBFGS(params, lr=recipe.lr, max_iter=LBFGS_ITERATIONS_PER_EPOCH, history_size=50,
                                 tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, foreach=True)
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=recipe.lr, weight_decay=config.weight_decay, foreach=True)


def make_schedule(optimizer, recipe: Recipe, steps_per_epoch: int):
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total,
                                                   pct_start=0.1, div_factor=10, final_div_factor=100)
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=recipe.lr * 1e-3)
    return None


@dataclass
class TrainResult:
    recipe: Recipe
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stopped: str = ""
    seconds: float = 0.0
    grad_norms: dict[str, float] = field(default_factory=dict)


def train(model: torch.nn.Module, data: TrainData, config, reporter) -> TrainResult:
    """Train ``model`` in place on ``data``; the best weights by validation loss are restored at the end."""
    n_train = len(data.X_train)
    params = [p for p in model.parameters() if p.requires_grad]
    recipe = choose_recipe(config, n_train, sum(p.numel() for p in params))
    optimizer = make_optimizer(params, recipe, config)
    steps_per_epoch = 1 if recipe.optimizer == "lbfgs" else math.ceil(n_train / recipe.batch_size)
    scheduler = make_schedule(optimizer, recipe, steps_per_epoch)
    has_val = len(data.X_val) > 0
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    deadline = time.perf_counter() + config.time_budget if config.time_budget else math.inf

    result = TrainResult(recipe)
    best_state = _copy_state(model)
    reporter.start(recipe, n_train, len(data.X_val))
    start = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        if recipe.optimizer == "lbfgs":
            train_loss = _lbfgs_epoch(model, optimizer, data.X_train, data.Y_train, config.grad_clip)
        else:
            perm = torch.randperm(n_train, generator=generator).to(data.X_train.device)
            train_loss = _epoch(model, optimizer, scheduler, data.X_train[perm], data.Y_train[perm],
                                recipe.batch_size, config, reporter, epoch, deadline)
        val_loss = evaluate_loss(model, data.X_val, data.Y_val) if has_val else train_loss
        train_loss, val_loss = torch.stack([train_loss.float(), val_loss.float()]).tolist()  # the epoch's one sync
        seconds = time.perf_counter() - epoch_start
        lr = optimizer.param_groups[0]["lr"]
        result.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                               "lr": lr, "seconds": seconds})
        if not math.isfinite(train_loss):
            model.load_state_dict(best_state)
            result.stopped = f"the training loss became {train_loss} at epoch {epoch}; kept the best weights"
            reporter.epoch(result.history[-1], improved=False)
            raise_divergence(result, config)
            break
        improved = val_loss < result.best_val_loss
        if improved:
            result.best_epoch, result.best_val_loss = epoch, val_loss
            best_state = _copy_state(model)
        reporter.epoch(result.history[-1], improved)
        if epoch - result.best_epoch >= recipe.patience:
            result.stopped = f"no better validation loss for {recipe.patience} epochs"
            break
        if time.perf_counter() >= deadline:
            result.stopped = f"time budget of {config.time_budget:g} s reached"
            break
    else:
        result.stopped = f"reached {recipe.epochs} epochs"
    result.seconds = time.perf_counter() - start
    result.grad_norms = {name: float(p.grad.norm()) if p.grad is not None else 0.0
                         for name, p in model.named_parameters()}
    model.load_state_dict(best_state)
    reporter.finish(result)
    return result


def raise_divergence(result: TrainResult, config) -> None:
    if result.best_epoch == 0:
        raise NnfitError(f"training diverged: {result.stopped.split(';')[0]} before any epoch improved; "
                         f"lower --lr (it was {result.recipe.lr:g}) or try --optimizer adam")


def _epoch(model, optimizer, scheduler, X, Y, batch_size, config, reporter, epoch, deadline) -> torch.Tensor:
    """One pass over the (already permuted) training data in contiguous slices."""
    n = len(X)
    total = torch.zeros((), device=X.device, dtype=torch.float64)
    log_every = config.log_every
    for step, i in enumerate(range(0, n, batch_size), start=1):
        xb, yb = X[i:i + batch_size], Y[i:i + batch_size]
        loss = _step(model, optimizer, xb, yb, config.grad_clip)
        if scheduler is not None:
            scheduler.step()
        total += loss.detach() * len(xb)
        if log_every and step % log_every == 0:
            reporter.batch(epoch, step, loss)
        reporter.tick(step, total, i + len(xb))
        if deadline != math.inf and time.perf_counter() >= deadline:
            return total / (i + len(xb))
    return total / n


def _step(model, optimizer, xb, yb, grad_clip) -> torch.Tensor:
    loss = F.mse_loss(model(xb), yb)  # shapes were checked equal before training
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip, foreach=True)
    optimizer.step()
    return loss


def _lbfgs_epoch(model, optimizer, X, Y, grad_clip) -> torch.Tensor:
    """Full-batch L-BFGS: one optimizer.step() runs up to LBFGS_ITERATIONS_PER_EPOCH iterations."""

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip, foreach=True)
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return F.mse_loss(model(X), Y)


def evaluate_loss(model, X, Y, chunk: int = 65536) -> torch.Tensor:
    """Mean squared error on standardized data, in chunks, keeping no graph."""
    model.eval()
    total = torch.zeros((), device=X.device, dtype=torch.float64)
    with torch.inference_mode():
        for i in range(0, len(X), chunk):
            total += F.mse_loss(model(X[i:i + chunk]), Y[i:i + chunk], reduction="sum").double()
    return total / max(1, Y.numel())


def _copy_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
