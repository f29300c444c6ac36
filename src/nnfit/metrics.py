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


SPREAD_KEYS = ("spearman", "coverage_2sigma", "mean_std")
SPREAD_MEANING = (
    "spearman: rank correlation between |error| and std over the points (1: the spread ranks the errors "
    "perfectly, 0: no relation); coverage_2sigma: share of points whose true value lies within mean ± 2 std "
    "(about 0.95 if the errors were normal with that std). The members differ only in initial weights and data "
    "order, so their spread measures how much the fit depends on those, not the noise in the data: on a "
    "noiseless smooth fit inside the domain it can rank the errors poorly and cover few points, while "
    "outside the domain, where the members disagree, it grows.")


def spread_metrics(members: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """How well an ensemble's spread tracks its error. ``members``: (K, n, k) predictions; ``true``: (n, k).

    The Spearman rank correlation between |mean - true| and std, and the share of points within
    mean ± 2 std, are averaged over the targets; ``mean_std`` is the average std.
    """
    members, true = members.double(), true.double()
    mean, std = members.mean(dim=0), members.std(dim=0)
    err = (mean - true).abs()
    spearman = torch.stack([_pearson(_ranks(err[:, j]), _ranks(std[:, j])) for j in range(true.shape[1])]).mean()
    coverage = (err <= 2 * std).double().mean()
    values = torch.stack([spearman, coverage, std.mean()])  # one host sync
    return dict(zip(SPREAD_KEYS, values.tolist()))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = torch.argsort(v)
    sorted_v = v[order]
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype, device=v.device)
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # the first position of each group of equal values
    average = (first + (counts - 1) / 2).to(v.dtype)
    ranks[order] = average[inverse]
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    denom = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return torch.where(denom > 0, (a * b).sum() / denom.clamp_min(1e-300), torch.zeros_like(denom))


def ensemble_metrics(members: torch.Tensor, true: torch.Tensor) -> dict:
    """An ensemble's evaluation from its members' predictions (K, n, k): the mean's metrics, each member's,
    the median member's MSE, and how well the spread tracks the error (``spread_metrics``)."""
    each = [regression_metrics(m, true) for m in members]
    mses = sorted(m["mse"] for m in each)
    k = len(mses)
    median = mses[k // 2] if k % 2 else (mses[k // 2 - 1] + mses[k // 2]) / 2
    return {"mean": regression_metrics(members.mean(dim=0), true), "members": each, "median_member_mse": median,
            "spread": spread_metrics(members, true)}


def per_target_metrics(pred: torch.Tensor, true: torch.Tensor, names) -> dict[str, dict[str, float]]:
    """``regression_metrics`` of each target column on its own, keyed by target name."""
    return {name: regression_metrics(pred[:, j:j + 1], true[:, j:j + 1]) for j, name in enumerate(names)}
