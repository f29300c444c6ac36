"""What a run shows: metrics tables, metrics.csv, fit.png and loss.png (matplotlib imported lazily)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from nnfit.checkpoint import atomic_write_bytes
from nnfit.metrics import KEYS

LABELS = {"mse": "MSE", "rmse": "RMSE", "mae": "MAE", "r2": "R²", "max_abs_error": "max abs error"}


def metrics_table(columns: dict[str, dict | None], per_target: dict[str, dict] | None = None) -> str:
    """A plain-text table: one row per metric, one column per evaluated set.

    ``per_target`` (``summary["per_target"]`` of a run with several targets: set -> target -> metrics)
    adds one table per set with a column per target.
    """
    columns = {name: m for name, m in columns.items() if m}
    if not columns:
        return ""
    tables = [_text_table(columns)]
    for name, targets in (per_target or {}).items():
        tables.append(f"{name}, per target:\n" + _text_table(targets))
    return "\n\n".join(tables)


def _text_table(columns: dict[str, dict]) -> str:
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
        atomic_write_bytes(out / "loss.png", _figure_bytes(loss_figure(fitted.history, _run_name(fitted),
                                                                       (fitted.summary or {}).get("samples"))))
    fig = fit_figure(fitted, problem)
    if fig is not None:
        atomic_write_bytes(out / "fit.png", _figure_bytes(fig))


def _run_name(fitted) -> str:
    if fitted.formula is not None:
        return fitted.formula.text
    source = (fitted.summary or {}).get("source")
    return ", ".join(fitted.target_names) + (f" from {source}" if source else "")


def plain(value: float, _pos=None) -> str:
    """A tick label a reader takes in at a glance: 0.02, 1.5, 1e-5, 2.5e+4; never a power of ten in math text."""
    if value == 0:
        return "0"
    text = f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2g}"
    return text.replace("e-0", "e-").replace("e+0", "e+")


def readable_ticks(axis, n: int = 5) -> None:
    """At most ``n`` plain labels on a linear ``axis`` (ax.xaxis or ax.yaxis): they never run into each other."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=n))
    axis.set_major_formatter(FuncFormatter(plain))


def loss_figure(history, name: str = "", samples: dict | None = None):
    """Training and validation loss per epoch: whole epochs on x; y on a log scale when it spans a decade."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    series = {"train": [r["train_loss"] for r in history], "validation": [r["val_loss"] for r in history]}
    for label, values in series.items():
        ax.plot(epochs, values, marker="o" if len(epochs) <= 20 else None, ms=3, label=label)
    positive = [v for values in series.values() for v in values if v == v and 0 < v < float("inf")]
    if positive and max(positive) >= 10 * min(positive):
        ax.set_yscale("log")
        decades = math.log10(max(positive) / min(positive))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades > 3 else (1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:  # less than a decade: a log axis would have one labelled tick or none
        readable_ticks(ax.yaxis, 6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.0f}"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (standardized units)")
    sets = f" ({samples.get('train')} training, {samples.get('validation')} validation samples)" if samples else ""
    ax.set_title(f"{name + ': ' if name else ''}loss per epoch{sets}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return fig


def draw_prediction(ax, x, mean, std=None, label: str = "learned", color: str = "tab:red",
                    band_label: str = "±2 std") -> None:
    """The model's curve on ``ax``; with ``std`` (an ensemble's spread), a band of ±2 std around it."""
    ax.plot(x, mean, "--", color=color, lw=1.8, label=label)
    if std is not None:
        ax.fill_between(x, mean - 2 * std, mean + 2 * std, color=color, alpha=0.2, lw=0, label=band_label)


def _points(fitted, problem):
    """(X, Y, what) to compare the model with: a formula's test points, else the run's samples; or None."""
    formula = fitted.formula
    if formula is not None:
        from nnfit.api import TEST_SEED_OFFSET
        from nnfit.data import formula_values, sample_domain

        c = fitted.config
        X, Y = formula_values(formula, sample_domain(c.domain, c.test_samples, c.seed + TEST_SEED_OFFSET),
                              c.nonfinite, "test points")
        return X, Y, f"{len(X):,} fresh test points"
    if problem is not None:
        return problem.X, problem.Y, f"all {len(problem.X):,} samples (training and validation)"
    return None


def fit_figure(fitted, problem=None):
    """One panel per target. One input: the learned curve (and the true one, for a formula) with the
    samples, and the error below. More inputs: predicted against true, and a histogram of residuals.

    Each target's main axes carries the label ``target <name>``.
    """
    import matplotlib.pyplot as plt
    import torch

    points = _points(fitted, problem)
    if points is None:
        return None
    X, Y, what = points
    targets, formula = fitted.target_names, fitted.formula
    k = len(targets)
    name = _run_name(fitted)
    if len(fitted.input_names) == 1:
        var = fitted.input_names[0]
        low, high = fitted.config.domain[0][1:] if formula is not None else (float(X.min()), float(X.max()))
        ensemble = getattr(fitted, "members", 1) > 1
        if ensemble:  # reach a little past the data, where the members part ways and the band widens
            low, high = low - 0.15 * (high - low), high + 0.15 * (high - low)
        grid = torch.linspace(low, high, 500, dtype=torch.float64).reshape(-1, 1)
        learned = fitted.predict_tensor(grid)
        std = fitted.member_predictions(grid).std(dim=0) if ensemble else None  # (n, k): the members' spread
        truth = formula(grid).reshape(-1, 1) if formula is not None else None
        shown = problem if problem is not None else None
        fig, axes = plt.subplots(2, k, figsize=(6 * k, 5.5), sharex="col", height_ratios=(3, 1.3), squeeze=False)
        for j, target in enumerate(targets):
            ax, ax_err = axes[0, j], axes[1, j]
            ax.set_label(f"target {target}")
            if shown is not None:
                ax.scatter(shown.X[:, 0], shown.Y[:, j], s=6, alpha=0.35, color="tab:gray",
                           label=f"the {len(shown.X):,} samples")
            if truth is not None:
                ax.plot(grid[:, 0], truth[:, j], color="tab:blue", lw=2.5, label=f"true: {formula.text}")
                ax_err.plot(grid[:, 0], learned[:, j] - truth[:, j], color="tab:red", lw=1)
                ax_err.set_ylabel("learned − true")
            else:  # no true curve: show the residuals at the data points
                ax_err.scatter(X[:, 0], fitted.predict_tensor(X)[:, j] - Y[:, j], s=4, color="tab:red", alpha=0.5)
                ax_err.set_ylabel("residual")
            draw_prediction(ax, grid[:, 0], learned[:, j], None if std is None else std[:, j],
                            label=f"learned (mean of {fitted.members} members)" if ensemble else "learned",
                            band_label=f"±2σ of {fitted.members} members")
            ax_err.axhline(0, color="black", lw=0.6)
            for axis in (ax.yaxis, ax_err.yaxis, ax_err.xaxis):
                readable_ticks(axis)
            ax_err.set_xlabel(var)
            ax.set_ylabel(target)
            vs = "model vs truth" if truth is not None else "model vs data"
            ax.set_title(f"{name if k == 1 else target}: {vs} over {var} in [{low:.4g}, {high:.4g}]", fontsize=10)
            ax.legend(fontsize=8)
        return fig
    pred = fitted.predict_tensor(X)
    fig, axes = plt.subplots(k, 2, figsize=(10, 4 * k), squeeze=False)
    for j, target in enumerate(targets):
        ax1, ax2 = axes[j]
        ax1.set_label(f"target {target}")
        ax1.scatter(Y[:, j], pred[:, j], s=5, alpha=0.4)
        lo, hi = float(Y[:, j].min()), float(Y[:, j].max())
        ax1.plot([lo, hi], [lo, hi], color="tab:red", lw=1, label="predicted = true")
        ax1.set_xlabel(f"true {target}")
        ax1.set_ylabel(f"predicted {target}")
        ax1.set_title(f"{target}: predicted vs true on {what}", fontsize=10)
        ax1.legend(fontsize=8)
        ax2.hist((pred - Y)[:, j].numpy(), bins=50, color="tab:gray")
        ax2.set_xlabel(f"residual of {target} (predicted − true)")
        ax2.set_ylabel("count")
        ax2.set_title(f"{target}: residuals on {what}", fontsize=10)
        for axis in (ax1.xaxis, ax1.yaxis, ax2.xaxis, ax2.yaxis):
            readable_ticks(axis)
    fig.tight_layout()
    return fig
