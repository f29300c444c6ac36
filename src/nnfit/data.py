"""Samples to learn from: a formula over a domain or a table, validated, split and scaled."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from nnfit.errors import NnfitError, NnfitWarning
from nnfit.errors import setting as S
from nnfit.formula import Formula, parse_formula

TUTORIAL_FORMULA = "x**2 + x"
TUTORIAL_DOMAIN = (("x", 0.0, 1.0),)


@dataclass
class Problem:
    """All samples (float64, shape (n, d) and (n, k)) and what they mean."""

    X: torch.Tensor
    Y: torch.Tensor
    input_names: tuple[str, ...]
    target_names: tuple[str, ...]
    source: str
    formula: Formula | None = None
    domain: tuple = ()

    def __post_init__(self):
        # predict writes NAME_pred (and NAME_std) beside the table's columns: no input or target may have one of
        # those names, or a prediction would overwrite it.
        outputs = {f"{t}_{kind}": t for t in self.target_names for kind in ("pred", "std")}
        for name in (*self.input_names, *self.target_names):
            if name in outputs:
                raise NnfitError(f"the column {name!r} has the name predict gives to the predictions of the target "
                                 f"{outputs[name]!r}, so a prediction would overwrite it; rename that column")


def formula_of(config) -> Formula:
    return parse_formula(config.formula, [name for name, _, _ in config.domain])


def sample_domain(domain, n: int, seed: int, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """``n`` points drawn uniformly from the box ``domain`` with a seeded generator."""
    from nnfit import devices

    # The points, their values, the predictions and the errors, in float64: refused before allocating.
    per_point = (len(domain) + 3) * 8 * 2
    free = devices.free_host_memory()
    if n * per_point > free:
        raise NnfitError(f"{n:,} points of {len(domain)} input(s) need about {n * per_point / 1024**3:.1f} GB "
                         f"of memory with their values and predictions, more than the {free / 1024**3:.1f} GB "
                         f"free now; the most that fit is about {free // per_point:,}: ask for fewer "
                         "(--samples, --test-samples)")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    low = torch.tensor([d[1] for d in domain], dtype=torch.float64)
    high = torch.tensor([d[2] for d in domain], dtype=torch.float64)
    X = low + (high - low) * torch.rand(n, len(domain), generator=gen, dtype=torch.float64)
    return X.to(device=device, dtype=dtype)


def formula_values(formula: Formula, X: torch.Tensor, nonfinite: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the formula; drop (with a warning) or refuse points where it is not finite."""
    Y = formula(X).reshape(-1, 1)
    finite = torch.isfinite(Y[:, 0])
    bad = int((~finite).sum())
    if bad:
        example = X[~finite][0].tolist()
        where = ", ".join(f"{v}={x:.6g}" for v, x in zip(formula.variables, example))
        if nonfinite == "error" or bad == len(Y):
            raise NnfitError(
                f"formula {formula.text!r} is NaN or infinite at {bad} of {len(Y)} {what} (e.g. at {where}); "
                "narrow the domain" + (f" or pass {S('nonfinite', 'drop')}" if bad < len(Y) else ""))
        warnings.warn(f"formula {formula.text!r} is NaN or infinite at {bad} of {len(Y)} {what} "
                      f"(e.g. at {where}); they were dropped ({S('nonfinite', 'error')} refuses them)", NnfitWarning)
        X, Y = X[finite], Y[finite]
    return X, Y


def build_problem(config, data=None) -> Problem:
    """The samples a run learns from: a formula (the tutorial's by default) or a table."""
    if data is not None or config.data is not None:
        from nnfit.tables import load_table

        table = load_table(data if data is not None else config.data, config.target or None, config.inputs)
        X = torch.from_numpy(np.ascontiguousarray(table.X, dtype=np.float64))
        Y = torch.from_numpy(np.ascontiguousarray(table.Y, dtype=np.float64))
        return Problem(X, Y, tuple(table.input_names), tuple(table.target_names), table.source)
    if config.formula is None and config.domain:
        raise NnfitError(f"{S('domain')} was given without {S('formula')}")
    formula_text = config.formula or TUTORIAL_FORMULA
    domain = config.domain or TUTORIAL_DOMAIN
    if config.formula is None:
        config = config.replace(formula=formula_text, domain=domain)
    formula = formula_of(config)
    unused = [name for name, _, _ in domain if name not in _names_in(formula.text)]
    if unused:
        warnings.warn(f"domain variable(s) {', '.join(unused)} do not appear in formula {formula.text!r}",
                      NnfitWarning)
    X = sample_domain(domain, config.samples, config.seed)
    X, Y = formula_values(formula, X, config.nonfinite, "sample points")
    if len(Y) > 1 and bool((Y == Y[0]).all()):
        warnings.warn(f"formula {formula.text!r} is constant ({float(Y[0, 0]):g}) over the domain; "
                      "the fit is trivial", NnfitWarning)
    targets = tuple(config.target) or ("y",)
    if len(targets) != 1:
        raise NnfitError(f"a formula has one target, but {S('target')} names {len(targets)}: {', '.join(targets)}")
    return Problem(X, Y, formula.variables, targets, f"formula {formula.text!r}", formula, tuple(domain))


# Beyond this magnitude float32 (largest 3.4e38) cannot hold the scaling statistics and the predictions
# with room to spare: such samples train in float64 by themselves, with a warning that says so.
FLOAT32_LARGEST = 1e35
# Beyond this, squared errors overflow even float64 (largest 1.8e308): such samples are refused.
FLOAT64_LARGEST = 1e150


def dtype_for_values(problem: Problem, dtype: str, precision: str, device) -> str:
    """The dtype these samples can train in: ``dtype``, float64 for values beyond float32's range
    (with a warning), or an error naming the largest magnitude found where neither can hold them."""
    largest, where = 0.0, ""
    for T, names in ((problem.X, problem.input_names), (problem.Y, problem.target_names)):
        if T.numel():
            column_max = T.abs().amax(dim=0)
            j = int(column_max.argmax())
            if float(column_max[j]) > largest:
                largest, where = float(column_max[j]), names[j]
    what = f"{problem.source} reaches {largest:.3g} in {where!r}"
    if largest > FLOAT64_LARGEST:
        raise NnfitError(f"{what}; values beyond {FLOAT64_LARGEST:.0e} cannot be fitted, as their squared errors "
                         "overflow even float64; rescale them (e.g. fit the values divided by a power of ten)")
    if largest <= FLOAT32_LARGEST or dtype == "float64":
        return dtype
    if precision != "32" or torch.device(device).type == "mps":
        raise NnfitError(f"{what}, beyond float32's range (values up to {FLOAT32_LARGEST:.0e} are accepted), and "
                         f"{'--precision ' + precision if precision != '32' else 'mps'} has no float64 to train in; "
                         "rescale the values, or train in float64 on the CPU or CUDA")
    warnings.warn(f"{what}, beyond float32's range (values up to {FLOAT32_LARGEST:.0e}): training in float64 "
                  "(pass --dtype float64 to choose it yourself)", NnfitWarning, stacklevel=3)
    return "float64"


def _names_in(text: str) -> set[str]:
    import ast

    return {n.id for n in ast.walk(ast.parse(text, mode="eval")) if isinstance(n, ast.Name)}


def split_indices(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split into training and validation rows."""
    n_val = int(round(n * val_split))
    if val_split > 0 and n_val == 0:
        n_val = 1
    if n - n_val < 1:
        raise NnfitError(f"{n} sample(s) leave none for training after a {val_split:.0%} validation split; "
                         f"give more data or a smaller {S('val_split')}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return perm[n_val:], perm[:n_val]


@dataclass(frozen=True)
class Scaling:
    """Per-column mean and std of inputs and targets; the model sees standardized values."""

    x_mean: tuple[float, ...]
    x_std: tuple[float, ...]
    y_mean: tuple[float, ...]
    y_std: tuple[float, ...]

    @classmethod
    def fit(cls, X: torch.Tensor, Y: torch.Tensor, target_names=()) -> "Scaling":
        def stats(T):
            mean = T.mean(dim=0)
            std = T.std(dim=0, unbiased=False) if len(T) > 1 else torch.zeros_like(mean)
            constant = std <= 1e-12 * mean.abs().clamp_min(1.0)
            return mean, torch.where(constant, torch.ones_like(std), std), constant

        x_mean, x_std, _ = stats(X)
        y_mean, y_std, _ = stats(Y)  # a constant target was warned about where the samples were made
        return cls(*(tuple(t.tolist()) for t in (x_mean, x_std, y_mean, y_std)))

    @classmethod
    def from_dict(cls, d: dict) -> "Scaling":
        return cls(*(tuple(float(v) for v in d[k]) for k in ("x_mean", "x_std", "y_mean", "y_std")))

    def to_dict(self) -> dict:
        return {"x_mean": list(self.x_mean), "x_std": list(self.x_std),
                "y_mean": list(self.y_mean), "y_std": list(self.y_std)}

    def tensors(self, device, dtype):
        return [torch.tensor(v, device=device, dtype=dtype) for v in (self.x_mean, self.x_std, self.y_mean, self.y_std)]

    def scale_x(self, X: torch.Tensor) -> torch.Tensor:
        mean, std, _, _ = self.tensors(X.device, X.dtype)
        return (X - mean) / std

    def scale_y(self, Y: torch.Tensor) -> torch.Tensor:
        _, _, mean, std = self.tensors(Y.device, Y.dtype)
        return (Y - mean) / std

    def unscale_y(self, Y: torch.Tensor) -> torch.Tensor:
        _, _, mean, std = self.tensors(Y.device, Y.dtype)
        return Y * std + mean


def as_matrix(X, input_names, what: str = "X", allowed_extra=()) -> torch.Tensor:
    """A numpy array, DataFrame or tensor as a float64 tensor of shape (n, len(input_names)).

    A DataFrame is matched by column name; missing or extra columns are an error that names them,
    except columns named in ``allowed_extra`` (the model's targets), which are ignored.
    """
    d = len(input_names)
    if hasattr(X, "columns"):  # a pandas DataFrame
        cols = [str(c) for c in X.columns]
        missing = [c for c in input_names if c not in cols]
        extra = [c for c in cols if c not in input_names and c not in allowed_extra]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing column(s) {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected column(s) {', '.join(extra)}")
            raise NnfitError(f"{what} has {' and '.join(parts)}; the model was trained on: {', '.join(input_names)}")
        try:
            X = X.set_axis(cols, axis=1)[list(input_names)].to_numpy(dtype=np.float64)  # labels 0, 1 as "0", "1"
        except (TypeError, ValueError) as exc:
            raise NnfitError(f"{what} has non-numeric values: {exc}") from None
    if isinstance(X, torch.Tensor):
        T = X.detach().to("cpu", torch.float64)
    else:
        try:
            T = torch.from_numpy(np.array(X, dtype=np.float64, copy=True))
        except (TypeError, ValueError) as exc:
            raise NnfitError(f"{what} could not be read as numbers: {exc}") from None
    if T.ndim == 1 and d == 1:
        T = T.reshape(-1, 1)
    elif T.ndim == 0:
        T = T.reshape(1, 1) if d == 1 else T
    if T.ndim != 2 or T.shape[1] != d:
        raise NnfitError(f"{what} has shape {tuple(T.shape)}, but the model takes {d} input column(s) "
                         f"({', '.join(input_names)}); pass an array of shape (n, {d})")
    bad = ~torch.isfinite(T)
    if bool(bad.any()):
        rows, cols_ = bad.nonzero(as_tuple=True)
        where = ", ".join(f"row {r + 1} column {input_names[c]!r}" for r, c in zip(rows[:5].tolist(), cols_[:5].tolist()))
        raise NnfitError(f"{what} has NaN or infinite values at {where}; drop or fill them before predicting")
    return T
