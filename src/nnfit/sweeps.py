"""Sweeps: many configurations trained on one set of samples; the best by validation loss is kept.

The samples are built and split once and shared by every configuration, so the configurations differ
only in what is swept (learning rate, hidden widths and depth, activation). By default the sweep runs
successive halving: every configuration trains for a short budget, the best third by validation loss
goes on with three times the budget, and so on until one is left, which trains with the full budget
of an ordinary run (its own epochs and stop rules, as nnfit train). A 12-configuration sweep then costs
at most 12/27 + 4/9 + 2/3 + 1 = 2.6 full runs' epochs instead of 12; ``exhaustive=True`` trains every
configuration to the end.

Short rungs can mislead: a network that learns slowly at first but ends best is dropped after 1/27 of
its epochs. So when the grid lists the configuration that nnfit train would train with the same options
(the default network, activation and learning rate), that one trains first, in full, as an ordinary
run, and the halving's survivor replaces it only with a lower validation loss: such a sweep is never
worse on validation than the default run it contains. ``time_budget`` bounds the whole sweep's seconds:
the default's run may take all of it, the rungs share what is left in proportion to the epochs they
train, and the survivor's full run gets what is left at the end (bench/sweep.py measures both).

Configurations of one shape (widths, depth, activation) that differ in their learning rate and train
with a first-order optimizer (Adam, AdamW, SGD) train together, as the members of one stacked model with
a learning rate per member (the ensemble core's ``member_lrs``); the rest train one by one. L-BFGS runs
are never stacked: its line search takes one step for all parameters.

The test points are never used to choose: they are reported, not compared.
"""

from __future__ import annotations

import itertools
import math
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnfit.config import ACTIVATIONS, Config
from nnfit.errors import NnfitError, TrainingDiverged, TrainingInterrupted

ETA = 3  # successive halving keeps the best third of each rung and gives it three times the budget
SWEPT = ("lr", "hidden", "width", "depth", "activation")
SWEEP_CSV = "sweep.csv"


# Parsing the lists: the CLI's strings and the API's values meet here.

def parse_list(name: str, value) -> list:
    """One swept option as a list of values: ``"1e-3,3e-3"`` or ``[1e-3, 3e-3]`` for lr; ``"64,64:100,100"``
    or ``[(64, 64), (100, 100)]`` for hidden; ``"tanh,silu"`` for activation; ``"32,64"`` for width and depth."""
    flag = "--" + name
    sep = ":" if name == "hidden" else ","
    if isinstance(value, str):
        items = [v.strip() for v in value.split(sep)]
        if not any(items):
            example = {"hidden": "64,64:100,100", "lr": "1e-3,3e-3", "activation": "tanh,silu"}.get(name, "32,64")
            raise NnfitError(f"{flag} {value!r} lists no values; give them separated by '{sep}', such as "
                             f"{flag} {example}")
        if not all(items):
            raise NnfitError(f"{flag} {value!r} has an empty value (two '{sep}' in a row, or one at an end); "
                             f"give the values separated by single '{sep}'")
    elif name == "hidden" and isinstance(value, (tuple, list)) and value and all(isinstance(v, int) for v in value):
        items = [value]  # hidden=(64, 64): one shape, not two widths
    elif isinstance(value, (tuple, list)):
        items = list(value)
        if not items:
            raise NnfitError(f"{flag} is an empty list; give at least one value, or leave it out")
    else:
        items = [value]
    values = [_parse_value(name, flag, item) for item in items]
    for v in values:
        if values.count(v) > 1:
            raise NnfitError(f"{flag} lists {_show(name, v)} more than once; give each value once")
    return values


def _parse_value(name: str, flag: str, item):
    if name == "activation":
        if item not in ACTIVATIONS:
            raise NnfitError(f"{flag} lists {item!r}, which is not an activation; choose from "
                             f"{', '.join(ACTIVATIONS)}")
        return str(item)
    if name == "lr":
        try:
            lr = float(item)
        except (TypeError, ValueError):
            raise NnfitError(f"{flag} lists {item!r}, which is not a number; give learning rates such as "
                             "1e-3,3e-3") from None
        if not (math.isfinite(lr) and lr > 0):
            raise NnfitError(f"{flag} lists {item!r}; learning rates must be positive numbers")
        return lr
    if name == "hidden":
        try:
            widths = tuple(int(w) for w in (item.split(",") if isinstance(item, str) else item))
        except (TypeError, ValueError):
            widths = ()
        if not widths or any(w <= 0 for w in widths):
            raise NnfitError(f"{flag} lists {item!r}; each network is positive widths separated by ',' and the "
                             "networks are separated by ':', such as --hidden 64,64:100,100")
        return widths
    try:  # width, depth
        number = int(item)
    except (TypeError, ValueError):
        number = 0
    if number <= 0 or (isinstance(item, float) and not item.is_integer()):
        raise NnfitError(f"{flag} lists {item!r}; give positive integers such as {flag} 32,64")
    return number


def _show(name: str, value) -> str:
    if name == "hidden":
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid(base: Config, lr=None, hidden=None, width=None, depth=None, activation=None) -> list[Config]:
    """Every combination of the swept values, as the configs of ordinary runs (lr, then network, then activation)."""
    if hidden is not None and (width is not None or depth is not None):
        raise NnfitError("--hidden and --width/--depth both give the networks; use --hidden 64,64:100,100, or "
                         "--width 64,100 --depth 2,3 for every width at every depth")
    lrs = parse_list("lr", lr) if lr is not None else [base.lr]
    if hidden is not None:
        shapes = parse_list("hidden", hidden)
    elif width is not None or depth is not None:
        widths = parse_list("width", width) if width is not None else [base.hidden[0]]
        depths = parse_list("depth", depth) if depth is not None else [len(base.hidden)]
        shapes = [(w,) * d for d in depths for w in widths]
    else:
        shapes = [base.hidden]
    activations = parse_list("activation", activation) if activation is not None else [base.activation]
    configs = [base.replace(lr=lr_, hidden=shape, activation=act)
               for lr_, shape, act in itertools.product(lrs, shapes, activations)]
    if len(configs) < 2:
        raise NnfitError("this sweep has one configuration; give two or more values to --lr, --hidden, --width, "
                         "--depth or --activation (such as --lr 1e-3,3e-3), or train it with nnfit train")
    return configs


# The sweep.

@dataclass
class Trial:
    """One configuration of the sweep and how far it got."""

    index: int
    config: Config
    rung: int = 0  # the last rung it trained in (0 is the first)
    fitted: object = None  # the FittedModel of its last rung
    val_loss: float = math.inf  # best validation loss (standardized units) of its last rung
    seconds: float = 0.0  # training and evaluation, summed over its rungs
    diverged: str = ""
    settled: bool = False  # stopped by a stop rule that a larger budget would not change: no need to train again

    def row(self, winner: bool) -> dict:
        c, s = self.config, (self.fitted.summary if self.fitted is not None else {})
        val, test = s.get("validation") or {}, s.get("test") or {}
        return {"config": self.index + 1, "lr": c.lr, "hidden": ",".join(map(str, c.hidden)),
                "activation": c.activation, "recipe": s.get("recipe", ""), "rung": self.rung + 1,
                "epochs": s.get("epochs", 0), "val_loss": self.val_loss, "val_mse": val.get("mse"),
                "val_r2": val.get("r2"), "test_mse": test.get("mse"),
                "test_nmse": 1 - test["r2"] if "r2" in test else None, "seconds": round(self.seconds, 3),
                "selected": winner, "note": self.diverged or ("" if self.fitted is not None else
                                                              "not trained: the time budget was spent")}


@dataclass
class SweepResult:
    """What ``nnfit.sweep`` returns: the winner (an ordinary FittedModel) and one row per configuration."""

    best: object
    rows: list[dict] = field(default_factory=list)
    rungs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    path: Path | None = None

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def table(self) -> str:
        """Every configuration, the winner first, then by the rung reached and validation loss."""
        head = ["", "#", "lr", "hidden", "activation", "rung", "epochs", "val MSE", "test MSE", "test NMSE", "seconds"]
        lines = []
        for r in self.rows:
            lr = "auto" if r["lr"] is None else f"{r['lr']:g}"
            lines.append(["*" if r["selected"] else "", str(r["config"]), lr, r["hidden"], r["activation"],
                          str(r["rung"]), str(r["epochs"]), _num(r["val_mse"]), _num(r["test_mse"]),
                          _num(r["test_nmse"]), f"{r['seconds']:.2f}"])
        widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        return "\n".join([fmt(head), "-" * len(fmt(head)), *(fmt(row) for row in lines)])


def _num(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3e}"


def sweep(formula: str | None = None, domain=None, data=None, target=None, inputs=None, *, lr=None, hidden=None,
          width=None, depth=None, activation=None, exhaustive: bool = False, config: Config | None = None,
          reporter=None, **settings) -> SweepResult:
    """Train every combination of the swept values on one shared set of samples; keep the best.

    Args:
        formula, domain, data, target, inputs: the samples, as for ``nnfit.fit``; built once.
        lr: learning rates, ``[1e-3, 3e-3]`` or ``"1e-3,3e-3"``.
        hidden: networks, ``[(64, 64), (100, 100)]`` or ``"64,64:100,100"``; or ``width`` and ``depth``
            lists, every width at every depth.
        activation: ``["tanh", "silu"]`` or ``"tanh,silu"``.
        exhaustive: train every configuration with the full budget instead of successive halving.
        **settings: any other ``Config`` field, one value for all configurations. ``time_budget`` is the
            seconds of the whole sweep: the default configuration's full run (when the grid lists it) may
            use all of it, the rungs of successive halving share what is left in proportion to their
            epochs, and the last one (the survivor's full run) gets what is left. ``out`` writes the
            winner's run folder there, with ``sweep.csv`` beside it.

    Returns:
        A SweepResult: ``best`` (the winner's FittedModel), ``rows`` (one per configuration, also as
        ``frame()``), ``table()``. The winner is chosen by validation loss only, between the halving's
        survivor and the default configuration's full run.
    """
    from nnfit import devices
    from nnfit.data import build_problem, split_indices
    from nnfit.progress import Reporter

    from nnfit.api import config_and_frame

    config, frame_ = config_and_frame(formula, domain, data, target, inputs, config, settings)
    trials = [Trial(i, c) for i, c in enumerate(grid(config, lr, hidden, width, depth, activation))]
    _check_settings(config)
    reporter = reporter or Reporter(quiet=config.quiet, verbose=False)
    out = Path(config.out) if config.out else None
    if out is not None:
        _check_out(out, config.overwrite)

    started = time.perf_counter()
    problem = build_problem(config, frame_)  # once: every configuration learns from the same samples
    n_train = len(split_indices(len(problem.X), config.val_split, config.seed)[0])
    # The configuration nnfit train would train with these options, if the grid lists it: it trains first, in
    # full, and the halving's survivor must beat it on validation loss. A sweep that lists the default is then
    # never worse than the default run (on validation), whatever the short first rungs get wrong.
    _preflight(trials, config, problem, n_train)  # every configuration, before any trains
    default = None if exhaustive else _default_trial(trials, config, problem, n_train)
    contenders = [t for t in trials if t is not default]
    budgets = _budgets(len(contenders), exhaustive)
    if exhaustive:
        plan = "every configuration with the full budget"
    elif len(budgets) == 1:
        plan = f"#{contenders[0].index + 1} with the full budget"
    else:
        plan = (f"successive halving in {len(budgets)} rungs ({' → '.join(str(n) for n, _ in budgets)} "
                f"configurations, 1/{ETA ** (len(budgets) - 1)} of the budget first)")
    if default is not None:
        plan = f"#{default.index + 1}, the default, in full first; then {plan}"
    reporter.log(f"sweep of {len(trials)} configurations on {problem.source}, {len(problem.X)} samples: {plan}")
    ctx = devices.init_context(config)
    rungs = []
    final = len(budgets) - 1
    failed = True
    doing = ""  # what a stop signal interrupts, for its message
    try:
        if default is not None:  # an ordinary run: the sweep's time budget is the only limit it gets
            seconds = max(_left(config, started), 1e-3) if config.time_budget else None
            doing = f"the full run of #{default.index + 1} (the default configuration)"
            _train_trial(default, final, 1.0, seconds, problem, n_train, ctx, reporter, label="the default")
        work = [keep * fraction for keep, fraction in budgets]  # in full runs' epochs
        alive = contenders
        for rung, (keep, fraction) in enumerate(budgets):
            alive = alive[:keep]
            seconds = None
            if config.time_budget:  # what is left, shared in proportion to the epochs each rung trains
                left = _left(config, started)
                if left <= 0 and (default is not None or rung > 0):
                    reporter.log(f"  the time budget of {config.time_budget:g} s is spent: rung {rung + 1} "
                                 "and later are not trained")
                    break
                seconds = max(left * work[rung] / sum(work[rung:]) / keep, 1e-3)
            for group in _groups(alive, problem, n_train):
                doing = (f"rung {rung + 1} of {len(budgets)}, training configuration(s) "
                         f"{', '.join(f'#{t.index + 1}' for t in group)}")
                if len(group) > 1:
                    _train_stacked(group, rung, fraction, seconds, problem, n_train, ctx, reporter)
                else:
                    _train_trial(group[0], rung, fraction, seconds, problem, n_train, ctx, reporter)
            rungs.append({"rung": rung + 1, "configurations": [t.index + 1 for t in alive],
                          "budget": f"1/{round(1 / fraction)}" if fraction < 1 else "full"})
            alive = sorted(alive, key=lambda t: t.val_loss)  # validation only: the test points never choose
        failed = False
    except TrainingInterrupted as exc:
        raise _interrupted(exc, doing, out) from None
    finally:
        devices.cleanup_context(ctx, failed)
    # The finalists: the best of the last rung the halving trained, and the default's full run.
    reached = max((t.rung for t in contenders if t.fitted is not None), default=-1)
    finalists = [t for t in contenders if t.fitted is not None and t.rung == reached]
    finalists += [default] if default is not None else []
    winner = min(finalists or trials, key=lambda t: t.val_loss)
    if not math.isfinite(winner.val_loss):
        raise NnfitError(f"every configuration of the sweep diverged ({winner.diverged}); try smaller learning "
                         "rates")
    if winner.settled:  # stopped by itself in an earlier rung: its full run would stop at the same epoch
        winner.rung = final
        _as_full_run(winner, problem, n_train)
    ordered = sorted(trials, key=lambda t: (t is not winner, -t.rung, t.val_loss))
    result = SweepResult(winner.fitted, [t.row(t is winner) for t in ordered], rungs,
                         time.perf_counter() - started)
    best = winner.fitted
    best.summary["sweep"] = {"configurations": len(trials), "selected": winner.index + 1,
                             "selected_by": "validation loss", "default": default and default.index + 1,
                             "mode": "exhaustive" if exhaustive else "successive halving", "rungs": rungs,
                             "seconds": round(result.seconds, 3),
                             "table": SWEEP_CSV, "rows": result.rows}
    if out is not None:
        from nnfit import runfolder

        best.config = best.config.replace(out=str(out))
        with runfolder.Claim(out, overwrite=config.overwrite):
            # the ordinary run-folder writers; sweep.csv in the same commit as the model, before the plots
            best._write(out, plots=config.plots, problem=problem,
                        files={SWEEP_CSV: result.frame().to_csv(index=False).encode()})
        result.path = out
    return result


def _check_settings(config: Config) -> None:
    if config.devices > 1:
        raise NnfitError(f"a sweep trains in one process, but --devices {config.devices} was given; sweep with "
                         "--devices 1, then train the winner's settings with --devices N")
    if config.resume:
        raise NnfitError("a sweep cannot be resumed; run it again (its samples are drawn with the same seed)")
    if config.val_split == 0:
        raise NnfitError("a sweep chooses by validation loss, but --val-split 0 leaves no validation samples; "
                         "pass --val-split 0.1 or more")
    if config.tensorboard:
        raise NnfitError("--tensorboard was given to a sweep, which writes no TensorBoard events (its "
                         "configurations train as stacked groups, in rungs); drop --tensorboard, then train the "
                         "winner's settings with nnfit train --tensorboard to watch one run")


def _check_out(out: Path, overwrite: bool) -> None:
    """A sweep writes its winner at the end; refuse what train would refuse (a file, a used run folder) before
    spending the time, by train's own check (runfolder.Claim), which removes a folder it made."""
    import contextlib
    import os

    from nnfit import runfolder

    existed = os.path.lexists(out)
    with runfolder.Claim(out, overwrite=overwrite):
        pass
    if not existed:  # made by the check: the winner's commit makes it again at the end
        with contextlib.suppress(OSError):
            out.rmdir()


def _preflight(trials: list[Trial], config: Config, problem, n_train: int) -> None:
    """What each run would check only when it starts (its network's memory, --init-from's architecture),
    checked for every configuration before the first trains, so that a mistake costs no training time."""
    from nnfit import devices, runfolder
    from nnfit.model import element_size, training_memory

    n_in, n_out = len(problem.input_names), len(problem.target_names)
    problems = []
    if config.init_from:
        theirs = runfolder.read_model(config.init_from)[1]["architecture"]
        fixed = (theirs.get("type"), theirs.get("inputs"), theirs.get("outputs")) == ("mlp", n_in, n_out)
        wrong = [t for t in trials if not fixed or (list(t.config.hidden), t.config.activation) !=
                 (list(theirs.get("hidden", [])), theirs.get("activation"))]
        if wrong:
            shape = (f"hidden {','.join(map(str, theirs['hidden']))}, activation {theirs['activation']}"
                     if theirs.get("type") == "mlp" else theirs.get("class", "a custom module"))
            keep = ("; sweep only what keeps that network (such as --lr), or drop --init-from to sweep networks "
                    "from scratch") if fixed else ("; start from a run with this data's inputs and targets, or drop "
                                                   "--init-from")
            problems.append(f"--init-from {config.init_from} is a network of {shape} "
                            f"({theirs.get('inputs')} input(s), {theirs.get('outputs')} output(s)), and configuration(s) "
                            f"{_names(wrong)} of the sweep build another network, which cannot start from its "
                            f"weights{keep}")
    free = devices.free_host_memory()
    size = element_size(config.dtype)
    need = {t.index: training_memory(n_in, n_out, t.config.hidden, t.config.ensemble, size, moments=2, batch=1,
                                     rows=0).total() for t in trials}
    big = [t for t in trials if need[t.index] > free]
    if big:
        problems.append(f"configuration(s) {_names(big)} of the sweep need up to about "
                        f"{devices._format_bytes(max(need[t.index] for t in big))} of memory to train, more than the "
                        f"{devices._format_bytes(free)} free now; drop those networks from --hidden (or --width/--depth), "
                        "or give them smaller widths")
    for group in _groups([t for t in trials if t not in big], problem, n_train):
        c = group[0].config
        if len(group) > 1 and training_memory(n_in, n_out, c.hidden, len(group) * c.ensemble, size, moments=2,
                                              batch=1, rows=0).total() > free:
            problems.append(f"configuration(s) {_names(group)} train together, stacked (one network, {len(group)} "
                            f"learning rates), and need more memory than the {devices._format_bytes(free)} free now; "
                            "list fewer learning rates in --lr, or give the network smaller widths")
    if problems:
        raise NnfitError("nothing was trained: " + "; and ".join(problems))


def _names(trials: list[Trial]) -> str:
    return ", ".join(f"#{t.index + 1} (hidden {','.join(map(str, t.config.hidden))}, {t.config.activation})"
                     for t in trials)


def _budgets(n: int, exhaustive: bool) -> list[tuple[int, float]]:
    """(configurations kept, fraction of the full budget) per rung: 12 -> [(12, 1/27), (4, 1/9), (2, 1/3), (1, 1)]."""
    if exhaustive:
        return [(n, 1.0)]
    keep = [n]
    while keep[-1] > 1:
        keep.append(math.ceil(keep[-1] / ETA))
    return [(k, 1 / ETA ** (len(keep) - 1 - i)) for i, k in enumerate(keep)]


def _train_trial(trial: Trial, rung: int, fraction: float, seconds: float | None, problem, n_train: int, ctx,
                 reporter, label: str = "") -> None:
    """Train one configuration from the start with ``fraction`` of its full epochs, for at most ``seconds``."""
    from nnfit import api
    from nnfit.progress import Reporter

    config = trial.config
    if trial.settled:
        trial.rung = rung
        reporter.log(f"  rung {rung + 1}, #{trial.index + 1}: stopped by itself in rung {rung}, with no schedule "
                     "tied to the budget; a larger budget gives the same run")
        return
    full = _recipe(config, problem, n_train)
    # The full budget is the ordinary run's own settings (its config.json trains it again); a rung's share is
    # a fraction of the epochs that run would have.
    epochs = config.epochs if fraction == 1 else max(1, math.ceil(full.epochs * fraction))
    budget = config.replace(epochs=epochs, out=None, plots=False, quiet=True, verbose=False, tensorboard=False,
                            time_budget=seconds)
    started = time.perf_counter()
    try:
        fitted = api._fit(budget, ctx, None, None, Reporter(quiet=True), problem=problem)
        trial.val_loss = min(row["val_loss"] for row in fitted.history)
        trial.diverged = ""
        # Without a schedule the run is the same whatever its epoch budget until it stops; stopped by
        # patience or convergence, it would stop at the same epoch again.
        trial.settled = full.schedule == "none" and fitted.summary["stopped"].startswith(("no better", "L-BFGS conv"))
    except TrainingDiverged as exc:
        fitted, trial.val_loss, trial.diverged = None, math.inf, " ".join(str(exc).split())
    trial.seconds += time.perf_counter() - started
    trial.rung, trial.fitted = rung, fitted
    if fitted is not None:
        fitted.config = fitted.config.replace(quiet=config.quiet, plots=config.plots)
        _as_swept(fitted, config)
    lr = "auto" if config.lr is None else f"{config.lr:g}"
    outcome = f"validation loss {trial.val_loss:.3e}" if fitted is not None else "diverged"
    reporter.log(f"  {label or f'rung {rung + 1}'}, #{trial.index + 1}: lr {lr}, hidden {','.join(map(str, config.hidden))}, "
                 f"{config.activation}, {epochs or full.epochs} epochs: {outcome} "
                 f"({time.perf_counter() - started:.1f} s)")


def _as_swept(fitted, config: Config) -> None:
    """A configuration's run as the user's settings retrain it: the sweep's time budget (not the share of it the
    run had, an internal detail the stop reason names), and the epochs it trained when that share stopped it,
    so that its config.json, recipe, summary and the sweep's table give one epoch count."""
    trained = len(fitted.history)
    stopped = fitted.summary.get("stopped") or ""
    share = re.match(r"time budget of (\S+) s reached", stopped)
    if share and config.time_budget:
        fitted.summary["stopped"] = (f"its share ({float(share.group(1)):.2g} s) of the sweep's time budget of "
                                     f"{config.time_budget:g} s reached" + stopped[share.end():])
        planned = fitted.config.epochs
        if trained < planned:
            fitted.summary["recipe"] = re.sub(rf"\b{planned} epochs", f"{trained} of {planned} epochs",
                                              fitted.summary.get("recipe", ""), count=1)
            fitted.config = fitted.config.replace(epochs=trained)
    fitted.config = fitted.config.replace(time_budget=config.time_budget)


def _interrupted(exc: TrainingInterrupted, doing: str, out: Path | None) -> TrainingInterrupted:
    """A stop signal during a sweep: its configurations train without run folders, so say what was
    interrupted and that there is nothing to resume, instead of a single run's message."""
    name = signal.Signals(exc.exit_code - 128).name if exc.exit_code > 128 else "interrupted"
    again = " again" if getattr(exc, "at_once", False) else ""
    written = f"nothing was written to --out {out}" if out is not None else "no run folder was asked for (--out)"
    return TrainingInterrupted(f"{name}{again}: the sweep stopped in {doing or 'its preparation'}; {written}, and a "
                               "sweep cannot be resumed (nnfit resume takes a run folder): run the same command "
                               "again (its samples are drawn with the same seed), or fewer configurations or "
                               "--time-budget SECONDS to finish sooner", exc.exit_code,
                               at_once=getattr(exc, "at_once", False))


def _left(config: Config, started: float) -> float | None:
    """Seconds of the sweep's time budget still to spend (None: no budget)."""
    return config.time_budget - (time.perf_counter() - started) if config.time_budget else None


def _default_trial(trials: list[Trial], base: Config, problem, n_train: int) -> Trial | None:
    """The configuration whose run is the one nnfit train would run with the sweep's other options: the base
    network and activation, and the learning rate the recipe would pick (an explicit 3e-3 is Adam's auto)."""
    recipe = _recipe(base, problem, n_train)
    for t in trials:
        if (t.config.hidden, t.config.activation) == (base.hidden, base.activation) and \
                _recipe(t.config, problem, n_train) == recipe:
            return t
    return None


def _as_full_run(trial: Trial, problem, n_train: int) -> None:
    """A run that stopped by itself (patience, L-BFGS converged) with no schedule tied to its epochs is the
    full run's: say so in its config and recipe, which a short rung had capped."""
    full = _recipe(trial.config, problem, n_train)
    trial.fitted.config = trial.fitted.config.replace(epochs=trial.config.epochs)
    trial.fitted.summary["recipe"] = full.describe()


def _recipe(config: Config, problem, n_train: int):
    from nnfit.model import parameter_count
    from nnfit.train import choose_recipe

    n_params = parameter_count(len(problem.input_names), len(problem.target_names), config.hidden)
    return choose_recipe(config, n_train, n_params)


def _groups(trials: list[Trial], problem, n_train: int) -> list[list[Trial]]:
    """Configurations that differ only in their learning rate and train with a first-order optimizer form
    one group: one stacked computation with a learning rate per member. The rest train one by one."""
    groups: dict = {}
    for t in trials:
        recipe = _recipe(t.config, problem, n_train)
        stackable = recipe.optimizer != "lbfgs" and not t.settled and t.config.ensemble == 1
        key = (t.config.hidden, t.config.activation) if stackable else ("alone", t.index)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def _train_stacked(group: list[Trial], rung: int, fraction: float, seconds: float | None, problem, n_train: int,
                   ctx, reporter) -> None:
    """Train a group of one shape as the members of one stacked model, each at its own learning rate, then
    take each member out as its configuration's own model. Each member keeps its own best epoch."""
    from nnfit import api
    from nnfit.api import FittedModel
    from nnfit.metrics import regression_metrics
    from nnfit.progress import Reporter

    first = group[0].config
    full = _recipe(first, problem, n_train)
    lrs = [_recipe(t.config, problem, n_train).lr for t in group]
    budget = first.replace(ensemble=len(group), lr=lrs[0], epochs=max(1, math.ceil(full.epochs * fraction)),
                           out=None, plots=False, quiet=True, verbose=False, tensorboard=False,
                           time_budget=seconds * len(group) if seconds else None)
    started = time.perf_counter()
    try:
        stacked = api._fit(budget, ctx, None, None, Reporter(quiet=True), problem=problem, member_lrs=lrs)
    except TrainingDiverged:  # one member's divergence stops the group: train them one by one instead
        for t in group:
            _train_trial(t, rung, fraction, seconds, problem, n_train, ctx, reporter)
        return
    each = (time.perf_counter() - started) / len(group)
    from nnfit.data import split_indices

    val_idx = split_indices(len(problem.X), first.val_split, first.seed)[1]
    losses = stacked.summary["ensemble"]["best_val_losses"]
    for k, t in enumerate(group):
        single = FittedModel(stacked.module.member(k), stacked.scaling, stacked.input_names, stacked.target_names,
                             t.config.replace(epochs=budget.epochs, time_budget=budget.time_budget and seconds,
                                              quiet=t.config.quiet, plots=t.config.plots),
                             [{**row, "val_loss": row["val_loss"][k] if isinstance(row.get("val_loss"), list)
                               else row.get("val_loss")} for row in stacked.history])
        summary = {key: v for key, v in stacked.summary.items() if key != "ensemble"}
        summary["best_epoch"] = stacked.summary["ensemble"]["best_epochs"][k]
        summary["recipe"] = summary["recipe"].replace(f"lr {lrs[0]:g}", f"lr {lrs[k]:g}", 1) + \
            f" (stacked with {len(group) - 1} other learning rate(s))"
        summary["validation"] = regression_metrics(single.predict_tensor(problem.X[val_idx]), problem.Y[val_idx])
        if problem.formula is not None:
            summary["test"] = single.evaluate()
        summary["stacked"] = (f"trained as member {k + 1} of {len(group)} of one stacked computation (one learning "
                              "rate each); its metrics.csv holds the members' mean losses per epoch")
        single.summary = summary
        _as_swept(single, t.config)
        t.fitted, t.val_loss, t.rung, t.diverged = single, losses[k], rung, ""
        t.seconds += each
        reporter.log(f"  rung {rung + 1}, #{t.index + 1}: lr {lrs[k]:g}, hidden {','.join(map(str, t.config.hidden))}, "
                     f"{t.config.activation}, {budget.epochs} epochs, stacked with {len(group) - 1} more: "
                     f"validation loss {t.val_loss:.3e} ({each:.1f} s each)")
