"""The Python API: ``fit``, ``load`` and the fitted model. The CLI is a thin layer over this."""

from __future__ import annotations

import copy
import functools
import hashlib
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import nnfit
from nnfit import checkpoint, devices, freeze, runfolder, trainstate
from nnfit.config import INT64_MAX, Config
from nnfit.data import (Problem, Scaling, as_matrix, build_problem, dtype_for_values, formula_values, sample_domain,
                        split_indices)
from nnfit.errors import NnfitError, NnfitWarning, TrainingDiverged
from nnfit.errors import setting as S
from nnfit.formula import parse_formula
from nnfit.metrics import ensemble_metrics, per_target_metrics, regression_metrics
from nnfit.model import architecture, build_mlp, check_module, instantiate, members
from nnfit.progress import Reporter
from nnfit.train import TrainData, check_memory, choose_recipe, train

PREDICT_CHUNK = 65536
TEST_SEED_OFFSET = 1_000_003  # fresh test points never coincide with the training sample


class FittedModel:
    """A trained network with its scaling, names and provenance. Predictions are in original units.

    An ensemble (``ensemble=K``) holds a ``StackedMLP`` of K members: ``predict`` gives their mean, and
    ``predict(X, return_std=True)`` also their standard deviation, the ensemble's uncertainty.
    """

    def __init__(self, module, scaling: Scaling, input_names, target_names, config: Config,
                 history=None, summary=None):
        self.module = module
        self.scaling = scaling
        self.input_names = tuple(input_names)
        self.target_names = tuple(target_names)
        self.config = config
        self.history = list(history or [])
        self.summary = dict(summary or {})
        self.path: Path | None = None

    def __repr__(self) -> str:
        arch = architecture(self.module)
        shape = "→".join(map(str, [arch["inputs"], *arch["hidden"], arch["outputs"]])) if arch["type"] == "mlp" \
            else arch["class"]
        ensemble = f", ensemble={self.members}" if self.members > 1 else ""
        return f"FittedModel({shape}, inputs={list(self.input_names)}, targets={list(self.target_names)}{ensemble})"

    @property
    def members(self) -> int:
        """How many networks the model holds: K for an ensemble, else 1."""
        return members(self.module)

    @property
    def formula(self):
        c = self.config
        return parse_formula(c.formula, [d[0] for d in c.domain]) if c.formula else None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def predict_tensor(self, X: torch.Tensor) -> torch.Tensor:
        """Predictions for a float64 CPU tensor of shape (n, d), as float64 of shape (n, k); an ensemble's
        are the mean over its members."""
        out = self.member_predictions(X)
        return out if out.dim() == 2 else out.mean(dim=0)

    def member_predictions(self, X: torch.Tensor) -> torch.Tensor:
        """Every member's predictions: float64 (K, n, k) for an ensemble, (n, k) for a single network."""
        device = self.device
        dtype = next(self.module.parameters()).dtype
        x_mean, x_std, y_mean, y_std = self.scaling.tensors(device, dtype)
        self.module.eval()
        out = []
        chunk, i = getattr(self, "_chunk", PREDICT_CHUNK), 0
        guard = devices.MemoryGuard(self.config.min_batch_size, lambda line: warnings.warn(line, NnfitWarning))
        with torch.inference_mode():
            while i < len(X):
                try:
                    xb = (X[i:i + chunk].to(device=device, dtype=dtype) - x_mean) / x_std
                    out.append((self.module(xb) * y_std + y_mean).to("cpu", torch.float64))  # (b, k) or (K, b, k)
                except RuntimeError as exc:
                    if not devices.is_out_of_memory(exc):
                        raise
                    xb = None
                if xb is None:  # out of memory: the exception and what it held are gone; halve and retry
                    chunk = self._chunk = guard.halve(chunk, "prediction", device)
                    continue
                i += chunk
        if not out:
            empty = (0, len(self.target_names))
            return torch.empty(empty if self.members == 1 else (self.members, *empty), dtype=torch.float64)
        return torch.cat(out, dim=-2)

    def predict(self, X, return_std: bool = False):
        """Predict for ``X`` (numpy array, DataFrame with the input columns, or tensor).

        Returns shape (n,) for one target and (n, k) for several, in original units: for an ensemble,
        the mean of its members. With ``return_std=True`` (ensembles only), returns ``(mean, std)``, std
        being the members' standard deviation (with Bessel's correction) per sample and target.
        """
        if return_std and self.members == 1:
            raise NnfitError("return_std=True asks for the spread of an ensemble's members, but this model is a "
                             "single network, so there is no spread to give; train with ensemble=K (K >= 2, "
                             "CLI: --ensemble K)")
        out = self.member_predictions(as_matrix(X, self.input_names, allowed_extra=self.target_names))
        mean = (out if out.dim() == 2 else out.mean(dim=0)).numpy()
        if not return_std:
            return _squeezed(mean)
        return _squeezed(mean), _squeezed(out.std(dim=0).numpy())

    def predict_frame(self, data, out=None):
        """Predictions next to their inputs: a DataFrame with the input columns and one ``NAME_pred``
        column per target, and for an ensemble one ``NAME_std`` column (the members' standard deviation).
        ``data``: a table's path or a DataFrame. ``out`` (.csv or .parquet): also write it there (atomically)."""
        from nnfit.tables import read_inputs

        if out is not None:  # refused before anything is read or predicted
            out = str(out)
            runfolder.check_output(out)  # a regular file, and not one of a run folder's own files
            suffix = Path(out).suffix.lower()
            if suffix in OTHER_TABLE_SUFFIXES:
                raise NnfitError(f"--out {out} names a {suffix} file, but predict writes CSV or Parquet; name it "
                                 f"{Path(out).with_suffix('.csv').name} or {Path(out).with_suffix('.parquet').name}")
        if not isinstance(data, (str, Path)) and not hasattr(data, "columns"):
            raise NnfitError(f"predict_frame takes a table's path or a pandas DataFrame with the input columns "
                             f"({', '.join(self.input_names)}), got {type(data).__name__}; for an array use "
                             f"predict(X), or wrap it: pandas.DataFrame(X, columns={list(self.input_names)})")
        # A path or a DataFrame: missing, extra or repeated columns are one NnfitError that names them.
        frame = read_inputs(data, self.input_names, allowed_extra=self.target_names)
        X = frame[list(self.input_names)]
        pred, std = self.predict(X, return_std=True) if self.members > 1 else (self.predict(X), None)
        pred = np.asarray(pred).reshape(len(frame), -1)
        bad = int((~np.isfinite(pred)).any(axis=1).sum())
        if bad:
            warnings.warn(f"{bad} of {len(frame)} prediction(s) are not finite (NaN or infinite): their inputs overflow "
                          f"the network in {next(self.module.parameters()).dtype}, or its weights are not finite "
                          "(an edited run); check those rows' inputs", NnfitWarning, stacklevel=2)
        result = frame.copy()
        for i, name in enumerate(self.target_names):
            result[f"{name}_pred"] = pred[:, i]
            if std is not None:
                result[f"{name}_std"] = np.asarray(std).reshape(len(frame), -1)[:, i]
        if out is not None:
            if suffix in (".parquet", ".pq"):  # P.PARQUET too
                checkpoint.atomic_write_bytes(out, result.to_parquet(index=False))
            else:
                checkpoint.atomic_write_bytes(out, result.to_csv(index=False).encode())
        return result

    def export(self, format: str, out=None) -> Path:
        """Write a deployable ONNX or TorchScript model (scaling included); see ``nnfit.export.export``."""
        from nnfit.export import export

        return export(self, format, out)

    def evaluate(self, data=None, target=None, X=None, y=None, samples: int | None = None,
                 seed: int | None = None, members: bool = False) -> dict:
        """Metrics in original units on a table (``data``), on arrays (``X``, ``y``), or for a
        formula run with neither, on fresh points drawn from the domain.

        With ``members=True`` (ensembles only): ``{"mean": ..., "members": [...], "median_member_mse": ...,
        "spread": {"spearman", "coverage_2sigma", "mean_std"}}``, the metrics of the members' mean, of each
        member, and how well their spread tracks the error (``nnfit.metrics.SPREAD_MEANING`` says how to read it).
        """
        if members and self.members == 1:
            raise NnfitError("evaluate(members=True) reports an ensemble's members and their spread, but this "
                             "model is a single network; train with ensemble=K (K >= 2, CLI: --ensemble K)")
        if samples is not None and (not isinstance(samples, int) or samples <= 0):
            raise NnfitError(f"{S('samples')} must be a positive integer, got {samples!r}")
        if samples == 1:  # R² of one point is undefined (0/0), and so is the spread's rank correlation
            raise NnfitError(f"{S('samples')} 1 is too few to score a model (R² compares at least two points); "
                             f"pass {S('samples')} 2 or more, or leave it out for the run's test samples")
        if seed is not None and (not isinstance(seed, int) or not 0 <= seed <= INT64_MAX):
            raise NnfitError(f"{S('seed')} must be 0 or more and at most {INT64_MAX}, got {seed!r}")
        if X is not None:
            X_t = as_matrix(X, self.input_names)
            if y is None:
                raise NnfitError("evaluate(X=...) needs the true values too: evaluate(X=..., y=...)")
            try:
                Y_t = y.detach().to("cpu", torch.float64) if isinstance(y, torch.Tensor) \
                    else torch.tensor(np.array(y, dtype=np.float64))
            except (TypeError, ValueError) as exc:
                raise NnfitError(f"y could not be read as numbers: {exc}") from None
            if Y_t.ndim == 0 or len(Y_t) != len(X_t):
                raise NnfitError(f"X has {len(X_t)} rows but y has {len(Y_t) if Y_t.ndim else 'no'} rows; "
                                 "they must have one row per sample")
            Y_t = Y_t.reshape(len(X_t), -1)
            if not bool(torch.isfinite(Y_t).all()):
                raise NnfitError("y has NaN or infinite values; drop those rows before evaluating")
        elif data is not None:
            from nnfit.tables import load_table

            table = load_table(data, target or list(self.target_names), list(self.input_names),
                               purpose="to score a model (R² compares at least two points)")
            X_t, Y_t = torch.from_numpy(table.X), torch.from_numpy(table.Y)
        else:
            formula = self.formula
            if formula is None:
                raise NnfitError("this model was trained on a table, so there is no formula to draw test points from; "
                                 f"pass a labelled table: {S('data', 'FILE')}")
            X_t, Y_t = test_points(self.config, formula, samples, seed)
        if Y_t.shape[1] != len(self.target_names):
            raise NnfitError(f"got {Y_t.shape[1]} target column(s), but the model predicts "
                             f"{len(self.target_names)} ({', '.join(self.target_names)})")
        if members:
            return ensemble_metrics(self.member_predictions(X_t), Y_t)
        return regression_metrics(self.predict_tensor(X_t), Y_t)

    def save(self, out, plots: bool = True, problem: Problem | None = None, overwrite: bool = False) -> Path:
        """Write the run folder: weights, metadata, config, metrics, summary and plots.

        A folder that already holds files is refused unless ``overwrite=True``, which replaces the run in it
        and keeps files that are not nnfit's. The files are written beside the previous run and moved into
        place at the end, so a failure leaves the previous run whole.
        """
        with runfolder.Claim(out, overwrite=overwrite):
            return self._write(out, plots, problem)

    def _write(self, out, plots: bool = True, problem: Problem | None = None, files: dict | None = None) -> Path:
        """Write the run into ``out``, whose claim the caller holds: staged, then committed; then the plots.
        ``files``: more of the run's files, name -> bytes, committed with the rest (a sweep's sweep.csv)."""
        from nnfit import report

        out = Path(out)
        self.path = out
        with trainstate.phase("saving the run", deferred=True,  # every file complete, then stop
                              kept=f"the model is saved in {out}" + (", without its plots" if plots else "")):
            keep = self._tensorboard_events(out)
            with runfolder.staged(out) as stage:
                self._write_files(stage)
                for name, data in (files or {}).items():
                    checkpoint.atomic_write_bytes(stage / name, data)
            runfolder.commit(out, keep=keep)
        if plots:
            from nnfit import html_report

            with trainstate.phase("writing the plots", kept=f"the model is saved in {out}, without its plots"):
                report.write_plots(out, self, problem)
                html_report.write_report(out, self, problem)  # embeds the loss.png and fit.png just written
        return out

    def _tensorboard_events(self, out: Path) -> tuple[str, ...]:
        """What of ``out``/tb the commit keeps: this run's events, written during training (tb/<its start>),
        and no earlier run's; all of tb for a run that names no folder (saved by an older nnfit). Saved into
        another folder than it trained in, the run's events are not there, and its summary stops naming them."""
        if not self.config.tensorboard:
            return ()
        events = self.summary.get("tensorboard")
        if events is None:
            return (runfolder.TENSORBOARD,)
        if not (out / events).is_dir():
            self.summary = {k: v for k, v in self.summary.items() if k != "tensorboard"}
            return ()
        return (events,)

    def _write_files(self, out: Path) -> None:
        """The run's model, metadata, config, summary and metrics (not the plots) into ``out``."""
        from nnfit import report

        state = self.module.state_dict()
        meta = {
            "nnfit_version": nnfit.__version__,
            "architecture": architecture(self.module),
            "dtype": str(next(self.module.parameters()).dtype).replace("torch.", ""),
            "input_names": list(self.input_names),
            "target_names": list(self.target_names),
            "scaling": self.scaling.to_dict(),
            "frozen": [n for n, p in freeze.unwrap(self.module).named_parameters() if not p.requires_grad],
        }
        checkpoint.save_weights(out, state, meta)
        checkpoint.write_json(out / "config.json", self.config.to_dict())
        if self.summary:
            checkpoint.write_json(out / "summary.json", self.summary)
        if self.history:
            report.write_metrics_csv(out / "metrics.csv", self.history)


# Table formats predict does not write: an --out with one of these suffixes is refused, not written as CSV.
OTHER_TABLE_SUFFIXES = (".xlsx", ".xls", ".json", ".jsonl", ".feather", ".arrow", ".h5", ".hdf5", ".npy", ".npz",
                        ".tsv", ".xml", ".html")


def _squeezed(pred: np.ndarray) -> np.ndarray:
    return pred[:, 0] if pred.shape[1] == 1 else pred


def fit(formula: str | None = None, domain=None, data=None, target=None, inputs=None, *, model=None,
        config: Config | None = None, reporter: Reporter | None = None, stop_signals: bool = False,
        **settings) -> FittedModel:
    """Learn a function from a formula over a domain, or from a table.

    Args:
        formula: e.g. ``"x**2 + x"``; with ``domain={"x": (0, 1)}``. With neither formula nor
            data, the tutorial's exercise ``x**2 + x`` on [0, 1] is learned.
        data: a path (.csv, .tsv, .parquet, .npy, .npz) or a pandas DataFrame.
        target, inputs: column names (a list, or a comma-separated string).
        model: your own ``torch.nn.Module`` (an instance, or a class built without arguments) in place of
            the built-in MLP. An instance is copied and the copy trained (``fitted.module``): the instance
            itself keeps its weights, so fitting it again starts afresh and leaves earlier results as they were.
        stop_signals: while training, SIGINT and SIGTERM save the training state and raise
            ``TrainingInterrupted`` (a second one stops at once), as ``nnfit train`` does.
        **settings: any ``Config`` field, named as the CLI option (``epochs``, ``batch_size``, ``lr``, ...).
            ``out`` writes the run folder there; ``verbose=True`` prints every epoch and the result.

    Returns:
        A FittedModel with ``predict``, ``evaluate`` and ``save``.
    """
    config, frame = config_and_frame(formula, domain, data, target, inputs, config, settings)
    if frame is not None and config.formula is not None:
        raise NnfitError("formula and data were both given; choose one source of samples")
    reporter = reporter or Reporter(quiet=config.quiet, verbose=config.verbose)
    launcher = config.devices > 1 and not devices.launched()
    # With --devices N the workers handle the signals (launch.py).
    with _signals(stop_signals and not launcher), _claim(config):
        if launcher:
            from nnfit import launch

            fitted = launch.fit_in_workers(config, frame, model)
            reporter.result(fitted, config.resume)
            return fitted
        return _fit_here(config, frame, model, reporter)


def config_and_frame(formula, domain, data, target, inputs, config: Config | None, settings: dict):
    """The settings of ``fit`` (and ``sweep``) as one Config, and the DataFrame given as ``data`` (or None)."""
    frame = None
    if data is not None and not isinstance(data, (str, Path)):
        frame, data = data, None
    given = {"formula": formula, "domain": domain, "data": str(data) if data is not None else None,
             "target": target, "inputs": inputs}
    values = {k: v for k, v in given.items() if v is not None}
    if config is None:
        return Config.from_dict({**values, **settings}), frame
    return (config.replace(**values, **settings) if values or settings else config), frame


def _signals(enabled: bool):
    """SIGINT and SIGTERM save the training state and stop (exit 130 or 143); a second one stops at once.
    Under DDP the ranks agree to stop at an epoch end; a worker ignores the echo of the launcher's
    forwarded signal."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext()
    return trainstate.handling_signals(trainstate.ECHO_SECONDS if devices.launched() else 0.0)


def _claim(config: Config):
    """The run folder's owner is the process that started the run: this one, or under torchrun rank 0
    (``--devices N`` workers run ``_fit_here`` under their launcher's claim)."""
    from contextlib import nullcontext

    if not config.out or devices.rank() != 0:
        return nullcontext()
    return runfolder.Claim(config.out, overwrite=config.overwrite, resume=config.resume)


def _fit_here(config: Config, frame, model, reporter: Reporter | None) -> FittedModel:
    """``fit`` in this process (one device, or one worker of a DDP run); prints the result."""
    ctx = devices.init_context(config)
    # Under torch.distributed only rank 0 prints progress, warnings and the result.
    if not ctx.is_main:
        reporter = Reporter(quiet=True)
    reporter = reporter or Reporter(quiet=config.quiet, verbose=config.verbose)
    failed = True
    try:
        with warnings.catch_warnings():
            if not ctx.is_main:
                warnings.simplefilter("ignore", NnfitWarning)
            with trainstate.phase("preparing the run", kept=functools.partial(_kept_after_stop, config.out)):
                fitted = _fit(config, ctx, frame, model, reporter)
        failed = False
    finally:
        devices.cleanup_context(ctx, failed)
    reporter.result(fitted, config.resume)
    return fitted


def _fit(config: Config, ctx, frame, user_model, reporter: Reporter,
         scaling: Scaling | None = None, problem: Problem | None = None, member_lrs=None) -> FittedModel:
    """``scaling`` (with ``user_model``, a trained module) continues a fit: nnfit.Regressor.partial_fit.
    ``problem``: samples already built (a sweep builds them once for all its configurations);
    ``member_lrs``: an ensemble's learning rate per member (a sweep's configurations of one shape)."""
    started = time.perf_counter()
    kept = functools.partial(_kept_after_stop, config.out)
    with trainstate.phase("loading the data", kept=kept):
        problem = problem or build_problem(config, frame)
    if problem.formula is not None and config.formula is None:
        config = config.replace(formula=problem.formula.text, domain=problem.domain)
    dtype_name = dtype_for_values(problem, config.dtype, config.precision, ctx.device)
    if dtype_name != config.dtype:
        config = config.replace(dtype=dtype_name)
    train_idx, val_idx = split_indices(len(problem.X), config.val_split, config.seed)
    if not config.resume:
        _warn_if_few_rows(config, problem, len(train_idx), len(val_idx))
    init = runfolder.read_model(config.init_from) if config.init_from else None
    if init is not None and not config.refit_scaling and scaling is None:
        scaling = Scaling.from_dict(init[1]["scaling"])  # fine-tuning keeps the run's units by default
    scaling = scaling or Scaling.fit(problem.X[train_idx], problem.Y[train_idx], problem.target_names)
    dtype = getattr(torch, config.dtype)

    torch.manual_seed(config.seed)
    if user_model is not None and config.ensemble > 1:
        raise NnfitError(f"{S('ensemble', config.ensemble)} stacks K copies of nnfit's own MLP into one computation, "
                         f"and a custom module ({type(user_model).__name__}) cannot be stacked; drop ensemble=, "
                         "or describe the network with --hidden and --activation")
    if isinstance(user_model, torch.nn.Module):  # a copy: a result the instance gave earlier keeps its weights
        try:
            user_model = copy.deepcopy(user_model)
        except (TypeError, RuntimeError, copy.Error) as exc:
            name = type(user_model).__name__
            raise NnfitError(f"model={name}(...) is trained on a copy, so that the instance and earlier results "
                             f"keep their weights, but it could not be copied ({str(exc).splitlines()[0]}); pass a "
                             f"class or a function that builds a fresh one instead: model={name} or "
                             f"model=lambda: {name}(...)") from None
    if user_model is not None:
        user_model = instantiate(user_model)
        check_module(user_model, problem.input_names, problem.target_names, None, None)
    module = user_model or build_mlp(len(problem.input_names), len(problem.target_names), config)
    if init is not None:
        _start_from(module, *init, config.init_from, problem.input_names)
    if config.freeze:
        freeze.freeze(module, config.freeze)  # before placing: a distributed wrapper must see the final flags
    ctx = _small_lbfgs_on_cpu(config, ctx, module, len(train_idx), reporter)
    check_memory(module, config, len(train_idx), ctx, dtype, reporter)  # an ensemble: before it is placed
    module = devices.place_model(module, ctx, dtype)
    if user_model is not None:  # nnfit's own MLP (or stacked MLPs) is built to the data's shape
        check_module(module, problem.input_names, problem.target_names, ctx.device, dtype)

    devices.reset_peak_memory(ctx)
    nbytes = len(problem.X) * (problem.X.shape[1] + problem.Y.shape[1]) * torch.finfo(dtype).bits // 8
    data_at, data_line = devices.data_device(config.data_on, ctx, nbytes)

    def prepared(idx):
        X = scaling.scale_x(problem.X[idx])
        Y = scaling.scale_y(problem.Y[idx])
        return devices.to_device(X, ctx, dtype, data_at), devices.to_device(Y, ctx, dtype, data_at)

    data = TrainData(*prepared(train_idx), *prepared(val_idx))
    before = _before(module, init[1], config, problem, val_idx) if init is not None else None
    workers = f" and {ctx.world_size - 1} more worker(s), DDP over {ctx.backend}" if ctx.distributed else ""
    reporter.log(f"learning {problem.source} with {len(problem.input_names)} input(s) "
                 f"({', '.join(problem.input_names)}) on {ctx.device}{workers}")
    reporter.log(data_line)
    saver = _saver(config, ctx, problem, user_model, module) if config.out else None
    events = f"{runfolder.TENSORBOARD}/{saver.info['tensorboard_run']}" if config.tensorboard and saver else None
    try:
        with trainstate.phase("training", deferred=True, kept=kept):  # the loop saves its state and stops
            result = train(module, data, config, reporter, ctx, saver, member_lrs=member_lrs)
    except TrainingDiverged as exc:
        raise _keep_best(exc, module, scaling, problem, config, ctx, events) from None

    fitted = FittedModel(module, scaling, problem.input_names, problem.target_names, config, result.history)
    with trainstate.phase("the final evaluation", kept=kept):
        val_pred = fitted.predict_tensor(problem.X[val_idx]) if len(val_idx) else None
        validation = regression_metrics(val_pred, problem.Y[val_idx]) if len(val_idx) else None
        X_test = Y_test = test = None
        if problem.formula is not None:
            X_test, Y_test = test_points(config, problem.formula)
            test = fitted.evaluate(X=X_test, y=Y_test)
    summary = {
        "nnfit_version": nnfit.__version__,
        "source": problem.source,
        "inputs": list(problem.input_names),
        "targets": list(problem.target_names),
        "samples": {"train": len(train_idx), "validation": len(val_idx)},
        "parameters": sum(p.numel() for p in module.parameters()),
        "recipe": result.recipe.describe(),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped": result.stopped,
        "train_seconds": round(result.seconds, 4),
        "device": str(ctx.device),
        "seed": config.seed,  # the one drawn for seed=None too: pass it to reproduce the run
        "validation": validation,
    }
    if len(problem.target_names) > 1 and len(val_idx):
        summary["per_target"] = {"validation": per_target_metrics(val_pred, problem.Y[val_idx], problem.target_names)}
    if problem.formula is not None:
        summary["test"] = test
        summary["test_samples"] = config.test_samples
    _require_finite_metrics(summary, config)  # before anything reads the metrics as numbers
    if problem.formula is not None:
        _warn_if_test_is_far_worse(validation, summary["test"], (fitted.predict_tensor(X_test) - Y_test) ** 2,
                                   len(train_idx))
    if init is not None:
        summary["init_from"] = before
    if result.frozen:
        summary["frozen"] = freeze.summary_line(result.frozen)
    summary["parameter_table"] = freeze.parameter_rows(module, result.grad_norms, result.moved, result.unfrozen_at)
    summary["world_size"] = ctx.world_size
    summary["precision"] = config.precision
    summary["data"] = data_line.removeprefix("data: ")
    summary["final_batch_size"] = result.batch_size_final
    summary["oom_retries"] = result.oom_retries
    if result.threads is not None:
        summary["threads"] = result.threads
    if events is not None:
        summary["tensorboard"] = events
    summary["peak_memory"] = devices.peak_memory(ctx)  # a collective under DDP: every rank gets here
    summary["total_seconds"] = round(time.perf_counter() - started, 4)
    summary["environment"] = {"torch": torch.__version__, "python": platform.python_version()}
    fitted.summary = summary
    if result.rollbacks:
        summary["rollbacks"] = result.rollbacks
    if result.member_best_epochs:
        summary["ensemble"] = {"members": len(result.member_best_epochs),
                               "best_epochs": result.member_best_epochs,
                               "best_val_losses": result.member_best_val_losses}
    fitted.config = config.replace(resume=False)  # config.json: the run's settings, however it was started
    if config.out and ctx.is_main:  # one writer: rank 0 (the module is the unwrapped one)
        fitted._write(config.out, plots=config.plots, problem=problem)  # replaces the training state too
    return fitted


def test_points(config: Config, formula, samples: int | None = None, seed: int | None = None):
    """Fresh points of a formula run's domain, never the training sample: X and the formula's values."""
    n = config.test_samples if samples is None else samples
    s = config.seed + TEST_SEED_OFFSET if seed is None else seed
    return formula_values(formula, sample_domain(config.domain, n, s), config.nonfinite, "test points")


# Below MIN_VALIDATION points a validation score says nothing useful: the MSE of n points has a relative
# standard error of about sqrt(2/n) (over 60% below 5 points), and R² of a single point is undefined (0).
MIN_VALIDATION = 5
# Below MIN_TRAIN_PER_INPUT training rows per input, the samples pin down little of a function between them.
MIN_TRAIN_PER_INPUT = 10


def _warn_if_few_rows(config: Config, problem: Problem, n_train: int, n_val: int) -> None:
    d = len(problem.input_names)
    # No validation rows at all (val_split 0) is a choice, not too few rows.
    if (n_val == 0 or n_val >= MIN_VALIDATION) and n_train >= MIN_TRAIN_PER_INPUT * d:
        return
    given = f"{S('samples', config.samples)} gives" if problem.formula is not None else \
        f"{problem.source} has {n_train + n_val} rows, which give"
    more = f"raise {S('samples')} to 100 or more" if problem.formula is not None else "use a larger table"
    warnings.warn(f"{given} {n_train} training row(s) and {n_val} validation row(s): a validation score needs at "
                  f"least {MIN_VALIDATION} points to mean anything (its R² of one point is 0 by definition), and "
                  f"{n_train} row(s) pin down little of a function of {d} input(s); {more}", NnfitWarning,
                  stacklevel=4)


def _warn_if_test_is_far_worse(validation, test, test_errors: torch.Tensor, n_train: int) -> None:
    """A fit that looks good on its validation rows but not on fresh points of the domain: say so, and why.
    ``test_errors``: the squared error of each test point."""
    if not validation or not test:
        return
    if not (test["r2"] < 0.99 and 1 - test["r2"] > 10 * max(1 - validation["r2"], 1e-12)):
        return
    worst = test_errors.flatten().sort(descending=True).values
    share = float(worst[:max(1, len(worst) // 100)].sum() / worst.sum().clamp_min(1e-300))
    if share > 0.5:  # errors concentrated in a sliver of the domain: a place where the function blows up
        why = (f"the worst 1% of the test points carry {share:.0%} of the squared error: the domain holds a "
               "singularity or a spike (such as 1/x near 0) that the training samples cannot cover; narrow the "
               "domain to leave it out, or learn a smoother quantity")
    elif n_train < 100:
        why = f"{n_train} training rows leave the function unconstrained between them; raise {S('samples')}"
    else:
        why = (f"the validation rows miss parts of the domain where the fit is poor; raise {S('samples')} or "
               "look at fit.png for where the errors are")
    warnings.warn(f"the test metrics are far worse than validation (R² {test['r2']:.4f} on fresh points of the "
                  f"domain against {validation['r2']:.4f} on the validation rows, MSE {test['mse']:.3g} against "
                  f"{validation['mse']:.3g}): {why}", NnfitWarning, stacklevel=4)


# Training rows x parameters up to which --device auto trains a full-batch L-BFGS fit on the CPU even where a
# GPU exists. L-BFGS reads its loss and curvature back to the host about 100 times an iteration, so such a fit
# is bound by those round trips on a GPU: the tutorial's exercise (900 rows x 10,401 parameters) trained in
# 2.87 s on an H200 and in 0.80 s on the same machine's CPU (bench/gpu.py, docs/benchmarks.md).
LBFGS_CPU_MAX_WORK = 2e7


def _small_lbfgs_on_cpu(config: Config, ctx, module, n_train: int, reporter: Reporter):
    """The context to train in: with --device auto on a GPU, the CPU for a small full-batch L-BFGS fit."""
    if config.device != "auto" or ctx.device.type != "cuda" or ctx.distributed:
        return ctx
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if choose_recipe(config, n_train, n_params).optimizer != "lbfgs" or n_train * n_params > LBFGS_CPU_MAX_WORK:
        return ctx
    reporter.log(f"device: cpu rather than {ctx.device}: a full-batch L-BFGS fit of {n_train:,} rows x {n_params:,} "
                 "parameters is bound by host round trips on a GPU and trains faster on the CPU; pass --device "
                 "cuda to train on the GPU anyway")
    return devices.Context(device=torch.device("cpu"))


def _kept_after_stop(out) -> str:
    """What a run stopped by a signal before its model was saved leaves behind."""
    if out and checkpoint.has_state(out):
        return f"the training state in {out} is intact; continue with: nnfit resume {out}"
    return "nothing of this run was saved"


def _require_finite_metrics(summary: dict, config: Config) -> None:
    """A run never reports success with NaN metrics: a NaN or infinite final metric is an error."""
    for split in ("validation", "test"):
        bad = {k: v for k, v in (summary.get(split) or {}).items()
               if isinstance(v, (int, float)) and not np.isfinite(v)}
        if bad:
            shown = ", ".join(f"{k} {v}" for k, v in bad.items())
            kept = f"; the training state in {config.out} is kept, but no model was saved" if config.out else ""
            raise NnfitError(f"the final {split} metrics of {summary['source']} are not finite ({shown}): the "
                             f"model's predictions overflow {config.dtype}; rescale the target or pass "
                             f"--dtype float64{kept}")


def _saver(config: Config, ctx, problem: Problem, user_model, module) -> trainstate.Saver:
    """Where the training state goes; with ``config.resume``, the verified state to continue from."""
    digest = hashlib.sha256()
    for T in (problem.X, problem.Y):
        digest.update(np.ascontiguousarray(T.numpy()).tobytes())
    fingerprint = digest.hexdigest()
    state = None
    if config.resume:
        state = trainstate.load(config.out)
        if state.info.get("fingerprint") != fingerprint:
            raise NnfitError(f"the samples of {problem.source} are not those the run in {config.out} started with "
                             "(the file changed, or another DataFrame was passed); resume needs the same data, "
                             "or start a new run")
        _check_state_fits(state, module, Path(config.out) / checkpoint.STATE)
    info = {"nnfit_version": nnfit.__version__, "config": config.replace(resume=False).to_dict(),
            "fingerprint": fingerprint, "source": "dataframe" if config.data is None and config.formula is None
            else problem.source, "custom_model": type(user_model).__name__ if user_model is not None else None}
    if config.tensorboard:  # RUN/tb/<this>: the run's events, continued by a resume, the only ones kept at the end
        info["tensorboard_run"] = (state.info.get("tensorboard_run") if state is not None else None) \
            or runfolder.new_events_name(config.out)
    return trainstate.Saver(config.out, config.checkpoint_every, ctx.is_main, info, state, ctx.distributed)


def _check_state_fits(state: trainstate.State, module, where: Path) -> None:
    """The saved model, best and starting tensors have this run's names, shapes and dtype."""
    module = freeze.unwrap(module)
    dtype = next(module.parameters()).dtype
    tensors = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    params = {k: tuple(p.shape) for k, p in module.named_parameters()}
    for prefix, expected in (("model", tensors), ("best", tensors), ("start", params)):
        runfolder.check_tensors(trainstate.part(state, prefix), expected, dtype, f"{where} ({prefix})")


def _keep_best(exc: TrainingDiverged, module, scaling: Scaling, problem: Problem, config: Config, ctx,
               events: str | None):
    """After a divergence that rollbacks could not cure: save the best weights (the module holds them), and
    the run's TensorBoard events (``events``: tb/<run>), which show how it diverged."""
    result = exc.result
    if result is None or not result.best_epoch:
        return TrainingDiverged(f"{exc.args[0]}; no epoch had improved, so there are no weights to keep", result)
    if not (config.out and ctx.is_main):
        return exc
    summary = {"nnfit_version": nnfit.__version__, "source": problem.source, "stopped": result.stopped,
               "best_epoch": result.best_epoch, "rollbacks": result.rollbacks, "diverged": True}
    if events is not None:
        summary["tensorboard"] = events
    FittedModel(module, scaling, problem.input_names, problem.target_names, config.replace(resume=False),
                result.history, summary)._write(config.out, plots=False)
    return TrainingDiverged(f"{exc.args[0]}. The best weights (epoch {result.best_epoch}, validation loss "
                            f"{result.best_val_loss:.4e}) are saved in {config.out}", result)


def _start_from(module, state, meta, path, input_names) -> None:
    """Load the weights of run ``path`` into ``module``; the architectures must match."""
    theirs, ours = meta["architecture"], architecture(module)
    if theirs != ours:
        differ = [k for k in dict.fromkeys([*theirs, *ours]) if theirs.get(k) != ours.get(k)]
        hint = " ".join(f"--{k} {','.join(map(str, theirs[k])) if isinstance(theirs[k], list) else theirs[k]}"
                        for k in ("hidden", "activation") if k in differ and k in theirs)
        raise NnfitError(
            f"{S('init_from', path)} has a different architecture (they differ in {', '.join(differ)}): "
            f"{path}: {_describe(theirs, meta.get('input_names'))}; this run: {_describe(ours, input_names)}. "
            + (f"Pass {hint} to build the same network" if hint
               else "Fine-tune on data with the same inputs and targets"))
    if list(meta.get("input_names", input_names)) != list(input_names):
        warnings.warn(f"{S('init_from', path)} was trained on inputs ({', '.join(meta['input_names'])}) and this run has "
                      f"({', '.join(input_names)}); the weights are used column by column, in this order",
                      NnfitWarning, stacklevel=3)
    module.load_state_dict(state)


def _describe(arch: dict, input_names=None) -> str:
    if arch.get("type") != "mlp":
        shapes = ", ".join(f"{n} {tuple(s)}" for n, s in arch.get("parameters", {}).items())
        return f"{arch.get('class')} with {shapes}"
    names = f" ({', '.join(input_names)})" if input_names else ""
    layers = [f"{arch['inputs']} input(s){names}", *arch["hidden"], f"{arch['outputs']} output(s)"]
    widths = " → ".join(map(str, layers))
    return f"{widths}, activation {arch['activation']}"


def _before(module, meta, config: Config, problem: Problem, val_idx) -> dict:
    """The --init-from model's errors on this run's validation and test points, before fine-tuning."""
    before = FittedModel(module, Scaling.from_dict(meta["scaling"]), problem.input_names, problem.target_names, config)
    out = {"run": str(config.init_from), "scaling": "recomputed" if config.refit_scaling else "kept from the run"}
    if len(val_idx):
        out["validation_before"] = before.evaluate(X=problem.X[val_idx], y=problem.Y[val_idx])
    if problem.formula is not None:
        X, Y = test_points(config, problem.formula)
        out["test_before"] = before.evaluate(X=X, y=Y)
    return out


def resume(run, data=None, model=None, reporter: Reporter | None = None, quiet: bool | None = None,
           verbose: bool | None = None, stop_signals: bool = False) -> FittedModel:
    """Continue a run that was stopped (killed, interrupted, out of disk space) from its training state.

    The samples are drawn again from the formula with the run's seed, or the table is read again;
    with a fixed seed, on the CPU or a CUDA GPU (deterministic kernels), the final weights are
    bit-identical to those of an uninterrupted run on the same device type.

    Args:
        run: the run folder (``out=`` of ``fit``, ``--out`` of ``nnfit train``).
        data: the DataFrame the run was trained on, if it was given one. A file is read again by itself,
            from the path in config.json; pass its path here if it moved or the run started elsewhere.
        model: a fresh instance (or the class) of the custom module the run was trained with, if any.
        quiet, verbose: override the run's own progress settings.
        stop_signals: as for ``fit``.

    Returns:
        The FittedModel, as ``fit`` returns it; the run folder is complete and its state removed.
    """
    run = Path(run)
    runfolder.check_free(run)  # a run that is still training is not resumed a second time
    state = trainstate.load(run)  # every problem with the state is reported before any work
    config = Config.from_dict(state.info["config"])  # checked by the reader
    if not config.out or Path(config.out).resolve() != run.resolve():
        config = config.replace(out=str(run))  # the folder was moved, or is named from elsewhere
    if data is not None and config.formula is not None:
        raise NnfitError(f"{run} learns the formula {config.formula!r}, whose samples are drawn again from its seed; "
                         f"{S('data')} is only for a table run whose table moved: drop it")
    if isinstance(data, (str, Path)):
        config, data = config.replace(data=str(data)), None
    elif data is None and config.data is not None and not Path(config.data).exists():
        raise NnfitError(f"the run's table {config.data} is not found from {Path.cwd()}; run nnfit resume from the "
                         f"folder the run was started in, or pass the table's path: {S('data', 'PATH')}")
    if data is None and state.info.get("source") == "dataframe":
        raise NnfitError(f"the run in {run} was trained on a DataFrame passed to fit(); pass the same one: "
                         "nnfit.resume(run, data=df)")
    if model is None and state.info.get("custom_model"):
        raise NnfitError(f"the run in {run} was trained with a custom module ({state.info['custom_model']}); "
                         "pass it: nnfit.resume(run, model=YourModule())")
    shown = {k: v for k, v in (("quiet", quiet), ("verbose", verbose)) if v is not None}
    if shown:
        config = config.replace(quiet=bool(quiet), verbose=bool(verbose))
    return fit(data=data, model=model, config=config.replace(resume=True), reporter=reporter,
               stop_signals=stop_signals)


def load(path, model: torch.nn.Module | None = None, device: str = "cpu") -> FittedModel:
    """Load a run folder written by ``fit(..., out=...)``, ``FittedModel.save`` or ``nnfit train``.

    Args:
        path: the run folder.
        model: a fresh instance of the custom module the run was trained with, if any.
        device: where the loaded model predicts: ``cpu`` (the default), ``auto``, ``cuda``, ``cuda:N``
            or ``mps``.

    Returns:
        A FittedModel whose predictions are bit-identical to those of the model that was saved, when
        both run on the same device. A model trained on a GPU and loaded on the CPU agrees with it to
        float rounding (the last digit or two): the two devices' kernels sum in different orders.
        Pass ``device=str(fitted.device)`` for the very same numbers.
    """
    run = runfolder.read_run(path)
    module = runfolder.build_module(run.weights, run.meta, model, str(path))
    module = module.to(devices.parse_device(device))
    fitted = FittedModel(module, Scaling.from_dict(run.meta["scaling"]), run.meta["input_names"],
                         run.meta["target_names"], run.config, summary=run.summary)
    fitted.path = Path(path)
    return fitted
