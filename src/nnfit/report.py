"""What a run shows: metrics tables, metrics.csv, fit.png and loss.png (matplotlib imported lazily)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from nnfit.checkpoint import atomic_write_bytes
from nnfit.metrics import KEYS

LABELS = {"mse": "MSE", "rmse": "RMSE", "mae": "MAE", "r2": "R²", "max_abs_error": "max abs error"}


def metrics_table(columns: dict[str, dict | None]) -> str:
    """A plain-text table: one row per metric, one column per evaluated set."""
    columns = {name: m for name, m in columns.items() if m}
    if not columns:
        return ""
    head = f"{'metric':<14}" + "".join(f"{name:>16}" for name in columns)
    rows = [head, "-" * len(head)]
    for key in KEYS:
        rows.append(f"{LABELS[key]:<14}" + "".join(f"{m[key]:>16.4e}" for m in columns.values()))
    return "\n".join(rows)


def write_metrics_csv(path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buf.getvalue().encode())


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_plots(out, fitted, problem=None) -> None:
    """loss.png always (when there is a history); fit.png when there is something to compare."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    out = Path(out)
    if fitted.history:
        atomic_write_bytes(out / "loss.png", _figure_bytes(loss_figure(fitted.history)))
    fig = fit_figure(fitted, problem)
    if fig is not None:
        atomic_write_bytes(out / "fit.png", _figure_bytes(fig))


def loss_figure(history):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    ax.semilogy(epochs, [r["train_loss"] for r in history], label="train")
    ax.semilogy(epochs, [r["val_loss"] for r in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (standardized units)")
    ax.set_title("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def fit_figure(fitted, problem=None):
    """One input: the learned curve (and the true one, for a formula) with the training points.
    More inputs: predicted against true, with a histogram of residuals."""
    import matplotlib.pyplot as plt
    import torch

    from nnfit.data import formula_values, sample_domain

    formula = fitted.formula
    if problem is not None:
        X, Y = problem.X, problem.Y
    elif formula is not None:
        X, Y = formula_values(formula, sample_domain(fitted.config.domain, 2000, fitted.config.seed + 7),
                              fitted.config.nonfinite, "plot points")
    else:
        return None
    target = fitted.target_names[0]
    if len(fitted.input_names) == 1:
        name = fitted.input_names[0]
        if formula is not None:
            low, high = fitted.config.domain[0][1:]
        else:
            low, high = float(X.min()), float(X.max())
        ensemble = getattr(fitted, "members", 1) > 1
        if ensemble:  # reach a little past the data, where the members part ways and the band widens
            low, high = low - 0.15 * (high - low), high + 0.15 * (high - low)
        grid = torch.linspace(low, high, 500, dtype=torch.float64).reshape(-1, 1)
        learned = fitted.predict_tensor(grid)[:, 0]
        fig, (ax, ax_err) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True, height_ratios=(3, 1.3))
        ax.scatter(X[:, 0], Y[:, 0], s=6, alpha=0.35, color="tab:gray", label="training points")
        if formula is not None:
            truth = formula(grid)
            ax.plot(grid[:, 0], truth, color="tab:blue", lw=2.5, label=f"true: {formula.text}")
            ax_err.plot(grid[:, 0], learned - truth, color="tab:red", lw=1)
            ax_err.set_ylabel("learned − true")
        else:  # no true curve: show the residuals at the data points
            ax_err.scatter(X[:, 0], fitted.predict_tensor(X)[:, 0] - Y[:, 0], s=4, color="tab:red", alpha=0.5)
            ax_err.set_ylabel("residual")
        ax_err.axhline(0, color="black", lw=0.6)
        ax_err.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.plot(grid[:, 0], learned, "--", color="tab:red", lw=1.8, label="learned" + (" (mean)" if ensemble else ""))
        if ensemble:
            std = fitted.member_predictions(grid)[:, :, 0].std(dim=0)
            ax.fill_between(grid[:, 0], learned - 2 * std, learned + 2 * std, color="tab:red", alpha=0.2,
                            label=f"±2σ of {fitted.members} members")
        ax_err.set_xlabel(name)
        ax.set_ylabel(target)
        ax.set_title("fit")
        ax.legend()
        return fig
    pred = fitted.predict_tensor(X)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.scatter(Y[:, 0], pred[:, 0], s=5, alpha=0.4)
    lo, hi = float(Y[:, 0].min()), float(Y[:, 0].max())
    ax1.plot([lo, hi], [lo, hi], color="tab:red", lw=1)
    ax1.set_xlabel(f"true {target}")
    ax1.set_ylabel(f"predicted {target}")
    ax1.set_title("predicted against true")
    ax2.hist((pred - Y)[:, 0].numpy(), bins=50, color="tab:gray")
    ax2.set_xlabel("residual (predicted − true)")
    ax2.set_title("residuals")
    return fig
