"""Every setting of a run, in one frozen dataclass, validated once.

The CLI builds its options from these fields, a run folder stores ``asdict``
of it, and every function downstream takes the config. This module must not
import torch: ``nnfit --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from nnfit.errors import NnfitError
from nnfit.errors import setting as S

OPTIMIZERS = ("auto", "adam", "adamw", "sgd", "lbfgs")
SCHEDULES = ("auto", "none", "cosine", "onecycle")
# The activations, named once: model.py builds the layers from this table (torch.nn class names).
ACTIVATION_LAYERS = {"relu": "ReLU", "tanh": "Tanh", "silu": "SiLU", "gelu": "GELU", "sigmoid": "Sigmoid"}
ACTIVATIONS = (*ACTIVATION_LAYERS, "none")
DTYPES = ("float32", "float64")
NONFINITE = ("drop", "error")
DATA_ON = ("auto", "device", "cpu")
PRECISIONS = ("32", "bf16", "16-mixed")
CUDA_GRAPH = ("auto", "off")
INT64_MAX = 2**63 - 1
MAX_THREADS = 1024  # CPU threads or worker processes: more is a typo, not a machine


def _opt(help: str, *, kind: str = "str", group: str = "training", choices=None, flag=None, cli=True,
         level: str = "common", commands=None):
    """Field metadata the CLI reads: help text, how to parse a string, where to list it.

    ``level``: "common" options are in ``nnfit train --help``; "advanced" ones only in ``--help-all``.
    ``commands``: the other subcommands that take this option, each with its help text there.
    """
    return {"help": help, "kind": kind, "group": group, "choices": choices, "flag": flag, "cli": cli,
            "level": level, "commands": commands or {}}


@dataclass(frozen=True)
class Config:
    """All settings of a run. Keyword names match the CLI options (``batch_size`` is ``--batch-size``)."""

    # What to learn.
    formula: str | None = field(default=None, metadata=_opt(
        "formula to learn, e.g. 'x**2 + x' (needs --domain for each variable)", group="data"))
    domain: tuple = field(default=(), metadata=_opt(
        "NAME=LOW:HIGH sampling range of a formula variable (repeat per variable)", kind="domain", group="data"))
    data: str | None = field(default=None, metadata=_opt(
        "table to learn from: .csv, .tsv, .parquet, .npy or .npz", group="data", commands={
            "resume": "the run's table, if it moved or the run was started from another folder",
            "predict": "table of inputs (.csv, .tsv, .parquet, .npy, .npz)",
            "evaluate": "table with the input and target columns (default for a formula run: fresh points "
                        "drawn from the domain)"}))
    target: tuple = field(default=(), metadata=_opt(
        "target column(s), comma-separated (default for .npy/.npz: the last column / y)", kind="strs", group="data",
        commands={"evaluate": "target column(s) in --data (default: those the model was trained on)"}))
    inputs: tuple | None = field(default=None, metadata=_opt(
        "input columns, comma-separated (default: every other numeric column)", kind="strs", group="data"))
    samples: int = field(default=1000, metadata=_opt(
        "number of random points drawn from the domain for a formula", kind="int", group="data",
        commands={"evaluate": "fresh points for a formula run (default: the run's test_samples)"}))
    test_samples: int = field(default=10000, metadata=_opt(
        "fresh points drawn from the domain to test a formula fit", kind="int", group="data", level="advanced"))
    nonfinite: str = field(default="drop", metadata=_opt(
        "what to do with formula points whose value is NaN or inf", choices=NONFINITE, group="data", level="advanced"))

    # The network.
    hidden: tuple = field(default=(100, 100), metadata=_opt(
        "hidden layer widths, comma-separated", kind="ints", group="model"))
    activation: str = field(default="tanh", metadata=_opt(
        "activation between layers ('none' makes the network linear)", choices=ACTIVATIONS, group="model"))
    ensemble: int = field(default=1, metadata=_opt(
        "train K networks at once as one stacked computation, differing in initial weights and data order; "
        "each keeps its own best epoch, and predictions are their mean with their standard deviation as the "
        "uncertainty", kind="int", group="model"))

    # Freezing and fine-tuning.
    freeze: tuple = field(default=(), metadata=_opt(
        "freeze parameters: an exact name (l1.weight), a layer (l1) or a glob ('l*.bias') (repeat)",
        kind="patterns", group="freeze"))
    init_from: str | None = field(default=None, metadata=_opt(
        "start from the weights of this run folder (the architecture must match)", group="freeze"))
    refit_scaling: bool = field(default=False, metadata=_opt(
        "with --init-from: recompute the scaling statistics from the new data instead of keeping the run's",
        kind="bool", group="freeze", level="advanced"))
    unfreeze_at: tuple = field(default=(), metadata=_opt(
        "EPOCH:PATTERN unfreeze the named frozen parameters from this epoch on (repeat)",
        kind="unfreeze", group="freeze", level="advanced"))
    lr_for: tuple = field(default=(), metadata=_opt(
        "PATTERN=LR learning rate of the named parameters, as their own parameter group (repeat; "
        "the last match wins; not for lbfgs)", kind="lr_for", group="freeze", level="advanced"))

    # Training.
    optimizer: str = field(default="auto", metadata=_opt(
        "optimizer; 'auto' picks by data size: full-batch L-BFGS for small data, Adam otherwise",
        choices=OPTIMIZERS))
    lr: float | None = field(default=None, metadata=_opt(
        "learning rate (default: 1 for lbfgs, 3e-3 for adam/adamw, 0.01 for sgd)", kind="float"))
    momentum: float = field(default=0.9, metadata=_opt("SGD momentum", kind="float", level="advanced"))
    epochs: int | None = field(default=None, metadata=_opt(
        "maximum number of epochs (default: 200 for lbfgs, enough for about 20,000 steps otherwise)",
        kind="int"))
    batch_size: int | None = field(default=None, metadata=_opt(
        "batch size (default: scaled to the data size; full batch for lbfgs)", kind="int"))
    weight_decay: float = field(default=0.0, metadata=_opt("weight decay", kind="float", level="advanced"))
    schedule: str = field(default="auto", metadata=_opt(
        "learning-rate schedule ('auto': onecycle for adam/adamw, none otherwise)", choices=SCHEDULES, level="advanced"))
    val_split: float = field(default=0.1, metadata=_opt(
        "fraction of the data held out for validation", kind="float", level="advanced"))
    patience: int | None = field(default=None, metadata=_opt(
        "stop after this many epochs without a better validation loss (default: 20, 10 for lbfgs, and none "
        "with an annealing schedule, onecycle or cosine, which trains every epoch)",
        kind="int", level="advanced"))
    time_budget: float | None = field(default=None, metadata=_opt(
        "stop training after this many seconds", kind="float"))
    grad_clip: float | None = field(default=None, metadata=_opt(
        "clip the gradient norm to this value", kind="float", level="advanced"))
    seed: int | None = field(default=0, metadata=_opt(  # None from Python: a fresh seed, recorded
        "random seed (same seed on the CPU: identical weights)", kind="int",
        commands={"evaluate": "seed of the fresh points"}))
    dtype: str = field(default="float32", metadata=_opt("floating-point type of the model and data", choices=DTYPES, level="advanced"))

    # Where it runs.
    device: str = field(default="auto", metadata=_opt(
        "auto, cpu, cuda, cuda:N or mps ('auto' prefers CUDA, then MPS, then the CPU)", group="device",
        commands={"predict": "device to predict on (default: cpu)", "evaluate": "device to evaluate on (default: cpu)"}))
    devices: int = field(default=1, metadata=_opt(
        "train with DistributedDataParallel on N local workers: N GPUs on CUDA, N processes on the CPU "
        "(--batch-size is the global batch)", kind="int", group="device"))
    data_on: str = field(default="auto", metadata=_opt(
        "where the training data lives: 'auto' keeps it on the GPU while it fits in half the free memory, "
        "else in pinned CPU memory with batches copied as they are used", choices=DATA_ON, group="device", level="advanced"))
    precision: str = field(default="32", metadata=_opt(
        "32, or mixed precision with autocast: bf16, or 16-mixed (fp16 with a gradient scaler); "
        "parameters and the saved model stay fp32", choices=PRECISIONS, group="device", level="advanced"))
    cuda_graph: str = field(default="auto", metadata=_opt(
        "on CUDA, run each training step as one captured CUDA graph where it can be (auto), or eagerly (off)",
        choices=CUDA_GRAPH, group="device", level="advanced"))
    min_batch_size: int = field(default=1, metadata=_opt(
        "after an out-of-memory error the batch is halved and retried, down to this size", kind="int",
        group="device", level="advanced"))
    threads: int | None = field(default=None, metadata=_opt(
        "CPU threads for torch's math during training (default: 1 for a small network on the CPU, where "
        "more threads only add synchronization; otherwise one per core that is free when training starts, "
        "since a thread waiting for a busy core slows every step; the run prints its choice)",
        kind="int", group="device", level="advanced"))

    # Output.
    out: str | None = field(default=None, metadata=_opt(
        "run folder to write (default: runs/<timestamp>)", group="output", commands={
            "predict": "write predictions to this file (.csv or .parquet) instead of printing them",
            "export": "file to write (default: RUN/model.onnx or RUN/model.pt)"}))
    overwrite: bool = field(default=False, metadata=_opt(
        "replace the run already in --out (its files that this run does not write are removed; files that "
        "are not nnfit's are kept); without it, a folder that holds files is refused", kind="bool",
        group="output"))
    log_every: int | None = field(default=None, metadata=_opt(
        "also print the loss every N batches", kind="int", group="output", level="advanced"))
    resume: bool = field(default=False, metadata=_opt(
        "continue from the training state saved in the run folder (what nnfit resume RUN sets)", kind="bool",
        group="output", cli=False))
    checkpoint_every: int | None = field(default=None, metadata=_opt(
        "save the training state (for nnfit resume RUN) every N optimizer steps and at the end of each epoch "
        "(default: at the end of each epoch, at most once a second)", kind="int", group="output", level="advanced"))
    plots: bool = field(default=True, metadata=_opt(
        "do not write fit.png, loss.png and report.html (the model, metrics and summary are still written)",
        kind="bool", group="output", flag="--no-plots"))
    tensorboard: bool = field(default=False, metadata=_opt(
        "write TensorBoard scalars (train and val loss, lr, grad norm, examples/s) to RUN/tb; needs the "
        "tensorboard package (pip install 'nnfit[tensorboard]')", kind="bool", group="output", level="advanced"))
    quiet: bool = field(default=False, metadata=_opt("print only errors and the result", kind="bool", group="output",
                                                     commands={"resume": "print only errors and the result"}))
    verbose: bool = field(default=False, metadata=_opt(
        "print every epoch and more detail", kind="bool", group="output",
        commands={"resume": "print every epoch"}))

    def __post_init__(self):
        problems = []
        if self.seed is None:  # a fresh seed, recorded here (and so in config.json) to reproduce the run
            object.__setattr__(self, "seed", fresh_seed())
        for f in dataclasses.fields(self):  # Config(domain={"x": (0, 1)}) as well as from_dict and replace
            try:
                object.__setattr__(self, f.name, normalize(f.name, getattr(self, f.name)))
            except NnfitError as exc:
                problems.append(exc.args[0])
                object.__setattr__(self, f.name, f.default)
        problems += self.problems()
        if problems:
            raise NnfitError("invalid settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with these settings, so that they can be reported at once."""
        p = []

        def positive(name, value, integer=True):
            if value is not None and (not math.isfinite(value) or value <= 0):
                p.append(f"{S(name)} must be a positive {'integer' if integer else 'number'}, got {value}")

        for name in ("samples", "test_samples", "epochs", "batch_size", "patience", "log_every", "devices",
                     "ensemble", "min_batch_size", "threads", "checkpoint_every"):
            positive(name, getattr(self, name))
        for name, most in (*((n, INT64_MAX) for n in ("samples", "test_samples", "epochs", "batch_size", "patience",
                                                       "log_every", "min_batch_size", "checkpoint_every", "seed",
                                                       "ensemble")),
                           ("threads", MAX_THREADS), ("devices", MAX_THREADS)):
            value = getattr(self, name)
            if isinstance(value, int) and value > most:  # torch takes 64-bit integers; threads are OS threads
                p.append(f"--{name.replace('_', '-')} must be at most {most}, got {value}")
        for name in ("lr", "time_budget", "grad_clip"):
            positive(name, getattr(self, name), integer=False)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            p.append(f"{S('weight_decay')} must be 0 or more, got {self.weight_decay}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            p.append(f"{S('momentum')} must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.val_split) and 0 <= self.val_split < 1):
            p.append(f"{S('val_split')} must be in [0, 1), got {self.val_split}")
        if self.seed < 0:
            p.append(f"{S('seed')} must be 0 or more, got {self.seed}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("activation", ACTIVATIONS),
                              ("dtype", DTYPES), ("nonfinite", NONFINITE)):
            value = getattr(self, name)
            if value not in allowed:
                p.append(f"{S(name)} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.hidden or any(int(h) != h or h <= 0 for h in self.hidden):
            p.append(f"{S('hidden')} must be positive widths such as 100,100, got {','.join(map(str, self.hidden)) or 'nothing'}")
        if self.formula is not None and self.data is not None:
            p.append(f"{S('formula')} and {S('data')} were both given; choose one source of samples")
        if self.data is None and self.domain and self.formula is None:
            p.append(f"{S('domain')} was given without {S('formula')}")
        names = [d[0] for d in self.domain]
        for name in {n for n in names if names.count(n) > 1}:
            p.append(f"{S('domain')} {name} is given more than once")
        for name, low, high in self.domain:
            if not (math.isfinite(low) and math.isfinite(high)):
                p.append(f"{_domain(name, low, high)} must have finite bounds")
            elif low == high:
                p.append(f"{_domain(name, low, high)} is empty; give LOW < HIGH")
            elif low > high:
                p.append(f"{_domain(name, low, high)} has reversed bounds; did you mean {_domain(name, high, low)}?")
        if self.dtype == "float64" and str(self.device).strip().lower() == "mps":
            p.append(f"{S('dtype', 'float64')} is not supported on mps (Apple GPUs have no float64); use {S('dtype', 'float32')}")
        if self.quiet and self.verbose:
            p.append(f"{S('quiet')} and {S('verbose')} were both given; choose one")
        if self.resume and not self.out:
            p.append(f"resume continues the run in a run folder, but none was given; pass {S('out', 'RUN')}")
        if self.tensorboard and not self.out:
            p.append(f"{S('tensorboard')} writes to RUN/tb, but no run folder was given; pass {S('out', 'RUN')}")
        if self.optimizer == "lbfgs" and self.schedule not in ("auto", "none"):
            p.append(f"{S('schedule', self.schedule)} does not apply to lbfgs; use {S('schedule', 'none')}")
        p += self._freeze_problems()
        p += self._device_problems()
        return p

    def _device_problems(self) -> list[str]:
        p = []
        for name, allowed in (("data_on", DATA_ON), ("precision", PRECISIONS), ("cuda_graph", CUDA_GRAPH)):
            value = getattr(self, name)
            if value not in allowed:
                p.append(f"{S(name)} must be one of {', '.join(allowed)}, got {value!r}")
        if self.precision != "32" and self.dtype != "float32":
            p.append(f"{S('precision', self.precision)} mixes float32 parameters with lower precision; "
                     f"it needs {S('dtype', 'float32')}, got {S('dtype', self.dtype)}")
        if self.precision == "16-mixed" and self.optimizer == "lbfgs":
            p.append(f"{S('precision', '16-mixed')} scales the loss for fp16, which L-BFGS's line search cannot use; "
                     f"use {S('precision', 'bf16')} or {S('optimizer', 'adam')}")
        if self.batch_size and self.min_batch_size and self.min_batch_size > self.batch_size:
            p.append(f"{S('min_batch_size', self.min_batch_size)} is larger than {S('batch_size', self.batch_size)}")
        if self.batch_size and self.devices and self.devices > 1 and self.batch_size < self.devices:
            p.append(f"{S('batch_size', self.batch_size)} is the global batch and must be at least "
                     f"{S('devices', self.devices)}, so that every worker gets a row")
        return p

    def _freeze_problems(self) -> list[str]:
        p = [f"{S('freeze')} needs a pattern such as l1, l1.weight or 'l*.bias', got {pattern!r}"
             for pattern in self.freeze if not pattern]
        for epoch, pattern in self.unfreeze_at:
            if epoch <= 0 or not pattern:
                p.append(f"{S('unfreeze_at')} must be EPOCH:PATTERN with a positive epoch, such as 5:l1, "
                         f"got {epoch}:{pattern}")
        for pattern, lr in self.lr_for:
            if not pattern or not (math.isfinite(lr) and lr > 0):
                p.append(f"{S('lr_for')} must be PATTERN=LR with a positive learning rate, such as l3=0.01, "
                         f"got {pattern}={lr}")
        if self.lr_for and self.optimizer == "lbfgs":
            p.append(f"{S('lr_for')} gives parameters their own learning rate, but lbfgs takes all parameters in one "
                     f"group; use {S('optimizer', 'adam')}, adamw or sgd")
        for epoch, pattern in self.unfreeze_at:
            if self.epochs is not None and epoch > self.epochs:
                p.append(f"{S('unfreeze_at', f'{epoch}:{pattern}', repr({epoch: pattern}))} is after the last epoch "
                         f"({S('epochs', self.epochs)}); "
                         f"unfreeze at epoch {self.epochs} or earlier")
        if self.refit_scaling and not self.init_from:
            p.append(f"{S('refit_scaling')} only applies with {S('init_from', 'RUN')}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Rebuild from ``to_dict`` output (JSON lists back to tuples); unknown keys are an error."""
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise NnfitError("; ".join(_unknown(name) for name in unknown))
        return cls(**{k: normalize(k, v) for k, v in values.items()})

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **{k: normalize(k, v) for k, v in changes.items()})


def _unknown(name: str) -> str:
    """An unknown setting: the closest known ones, not the whole list."""
    import difflib

    close = difflib.get_close_matches(name, list(FIELDS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(S(c) for c in close)}?" if close else \
        "the settings are the fields of nnfit.Config (nnfit train --help-all lists them as options)"
    return f"unknown setting {S(name)}; {hint}"


def normalize(name: str, value: Any) -> Any:
    """Bring an API or JSON value into the field's canonical form (tuples, floats)."""
    kind = FIELDS[name].metadata["kind"] if name in FIELDS else "str"
    if value is None:
        return None
    if name == "precision" and isinstance(value, int):  # precision=32 from Python
        return str(value)
    if kind in ("int", "float", "bool"):
        return _scalar(name, kind, value)
    if kind == "domain":
        return _normalize_domain(value)
    if kind == "strs":
        if isinstance(value, str):
            value = [v for v in value.split(",")]
        elif not isinstance(value, (list, tuple)) and not hasattr(value, "__array__"):
            value = [value]  # target=2: a DataFrame's integer column label, matched as "2"
        return tuple(str(v).strip() for v in value)
    if kind == "patterns":
        return tuple(v.strip() for item in ([value] if isinstance(value, str) else value) for v in str(item).split(","))
    if kind == "unfreeze":
        items = value
        if isinstance(value, dict):  # {5: "l1"} or {5: ["l1", "l2"]}
            items = [(e, pat) for e, pats in value.items() for pat in ([pats] if isinstance(pats, str) else pats)]
        pairs = [_parse_unfreeze(v) if isinstance(v, str) else tuple(v) for v in items]
        try:
            return tuple((_integer(epoch), str(pattern).strip()) for epoch, pattern in pairs)
        except (TypeError, ValueError):
            raise NnfitError(f"unfreeze_at must map epochs to patterns, such as {{5: 'l1'}}, got {value!r}") from None
    if kind == "lr_for":
        pairs = value.items() if isinstance(value, dict) else \
            [_parse_lr_for(v) if isinstance(v, str) else tuple(v) for v in value]
        try:
            return tuple((str(pattern).strip(), float(lr)) for pattern, lr in pairs)
        except (TypeError, ValueError):
            raise NnfitError("lr_for must map patterns to learning rates, such as {'l3': 0.01}, "
                             f"got {value!r}") from None
    if kind == "ints":
        return _widths(name, value)
    return value


def _widths(name: str, value) -> tuple:
    """Layer widths from Python: 8, (8, 8), "8,8" (as the CLI reads it), numpy integers or integral floats
    (4.0, np.array([8.0])) become ints; a non-integral or non-numeric width is kept for ``problems`` to report."""
    import numbers

    example = "integers such as hidden=(100, 100) or hidden='100,100'"
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(","))
        except ValueError:
            raise NnfitError(f"{S(name)} must be {example}, got {value!r}; give each width as a whole "
                             "number, separated by commas") from None
    if isinstance(value, numbers.Real):
        value = (value,)
    try:
        items = list(value)
    except TypeError:
        raise NnfitError(f"{S(name)} must be {example}, got {value!r}") from None
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise NnfitError(f"{S(name)} must be {example}, got {value!r} (the width {v!r} is not a number)")
        out.append(int(v) if math.isfinite(v) and float(v).is_integer() else v)
    return tuple(out)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def fresh_seed() -> int:
    """A random seed for ``seed=None``, drawn from the operating system's entropy."""
    import secrets

    return secrets.randbelow(2**31 - 1)


def _scalar(name: str, kind: str, value):
    """int, float and bool settings from Python: numpy scalars are fine, strings and bools-for-numbers not."""
    import numbers

    if kind == "bool":
        if isinstance(value, (bool, numbers.Integral)) and value in (0, 1):
            return bool(value)
        raise NnfitError(f"{S(name)} must be True or False, got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if kind == "float":
            return float(value)
        if float(value).is_integer():
            return int(value)
    what = "an integer" if kind == "int" else "a number"
    raise NnfitError(f"{S(name)} must be {what}, got {value!r}")


def _normalize_domain(value) -> tuple:
    """A domain from Python or JSON: {"x": (0, 1)}, "x=0:1", ["x=0:1", "y=-1:1"] or ((name, low, high), ...)."""
    example = "such as domain={'x': (0, 1)} or domain='x=0:1'"
    given = value
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").replace(" ", ",").split(",") if v]
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = []
        try:
            for v in value:
                parts = _parse_domain(v) if isinstance(v, str) else tuple(v)
                items.append((parts[0], parts[1:]))
        except (TypeError, ValueError, IndexError):
            raise NnfitError(f"{S('domain')} must give each variable a range (low, high), {example}; "
                             f"got {given!r}") from None
    out = []
    for item_name, bounds in items:
        try:
            if isinstance(bounds, str):
                bounds = _parse_domain(f"{item_name}={bounds}")[1:]
            low, high = (_number(b) if isinstance(b, str) else float(b) for b in bounds)
        except (TypeError, ValueError):
            raise NnfitError(f"{S('domain')}: the range of {item_name!r} must be (low, high), {example}; "
                             f"got {bounds!r}") from None
        out.append((str(item_name), low, high))
    return tuple(out)


def _domain(name: str, low: float, high: float) -> str:
    return S("domain", f"{name}={low:g}:{high:g}", f"{{{name!r}: ({low:g}, {high:g})}}")


def parse_cli_value(name: str, text: Any, problems: list[str]) -> Any:
    """Convert one CLI string for field ``name``; append a message to ``problems`` if it is bad."""
    meta = FIELDS[name].metadata
    flag = meta["flag"] or "--" + name.replace("_", "-")
    kind = meta["kind"]
    try:
        if kind in ("int", "float", "ints", "strs") and not isinstance(text, str):
            raise ValueError(text)  # never reached from the CLI, whose parser hands over strings
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "ints":  # every item a number: "1,,2" is a typo, not 1,2
            return tuple(int(v) for v in text.split(","))
        if kind == "strs":
            return tuple(v.strip() for v in text.split(",") if v.strip())
        if kind == "domain":
            return tuple(_parse_domain(item) for item in text)
        if kind in ("patterns", "unfreeze", "lr_for"):
            return _parse_items(name, flag, text, problems)
    except (ValueError, TypeError, AttributeError, OverflowError):
        example = {"int": "an integer", "float": "a number", "ints": "integers such as 100,100",
                   "domain": "NAME=LOW:HIGH such as x=0:1, with numbers or pi, -pi, 2pi, e as bounds"}.get(kind, "a value")
        problems.append(f"{flag} must be {example}, got {text!r}")
        return FIELDS[name].default
    return text


def _parse_items(name: str, flag: str, items, problems: list[str]) -> tuple:
    """A repeatable option: each bad item is reported on its own."""
    example = {"unfreeze": "EPOCH:PATTERN such as 5:l1", "lr_for": "PATTERN=LR such as l3=0.01"}
    out = []
    for item in items:
        try:
            out += normalize(name, [item])
        except (ValueError, TypeError, OverflowError, NnfitError):
            problems.append(f"{flag} must be {example[FIELDS[name].metadata['kind']]}, got {item!r}")
    return tuple(out)


def _parse_unfreeze(text: str) -> tuple[int, str]:
    epoch, sep, pattern = text.partition(":")
    if not sep:
        raise ValueError(text)
    return _integer(epoch), pattern.strip()


def _parse_lr_for(text: str) -> tuple[str, float]:
    pattern, sep, lr = text.rpartition("=")
    if not sep:
        raise ValueError(text)
    return pattern.strip(), float(lr)


def _integer(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _parse_domain(text: str) -> tuple[str, float, float]:
    name, sep, bounds = text.partition("=")
    low, sep2, high = bounds.partition(":")
    if not sep or not sep2 or not name.strip().isidentifier():
        raise ValueError(text)
    return name.strip(), _number(low), _number(high)


def _number(text: str) -> float:
    text = text.strip().lower()
    constants = {"pi": math.pi, "-pi": -math.pi, "2pi": 2 * math.pi, "-2pi": -2 * math.pi, "e": math.e}
    return constants[text] if text in constants else float(text)
