"""Regression metrics in original units: MSE, RMSE, MAE, R², max abs error."""

from __future__ import annotations

import torch

KEYS = ("mse", "rmse", "mae", "r2", "max_abs_error")


def regression_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Metrics of ``pred`` against ``true``, both of shape (n, k); R² is averaged over targets."""
    if pred.shape != true.shape:  # never let broadcasting turn (n,) against (n, 1) into (n, n)
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(true.shape)}")
    pred, true = pred.double(), true.double()
    err = pred - true
    mse = err.pow(2).mean()
    var = true.var(dim=0, unbiased=False)
    per_target_r2 = 1 - err.pow(2).mean(dim=0) / var.clamp_min(1e-300)
    per_target_r2 = torch.where(var > 0, per_target_r2, torch.zeros_like(per_target_r2))
    values = torch.stack([mse, mse.sqrt(), err.abs().mean(), per_target_r2.mean(), err.abs().max()])
    return dict(zip(KEYS, values.tolist()))


def per_target_metrics(pred: torch.Tensor, true: torch.Tensor, names) -> dict[str, dict[str, float]]:
    """``regression_metrics`` of each target column on its own, keyed by target name."""
    return {name: regression_metrics(pred[:, j:j + 1], true[:, j:j + 1]) for j, name in enumerate(names)}
