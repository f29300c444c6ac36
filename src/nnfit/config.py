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

OPTIMIZERS = ("auto", "adam", "adamw", "sgd", "lbfgs")
SCHEDULES = ("auto", "none", "cosine", "onecycle")
ACTIVATIONS = ("relu", "tanh", "silu", "gelu", "sigmoid", "none")
DTYPES = ("float32", "float64")
NONFINITE = ("drop", "error")
DATA_ON = ("auto", "device", "cpu")
PRECISIONS = ("32", "bf16", "16-mixed")


def _opt(help: str, *, kind: str = "str", group: str = "training", choices=None, flag=None, cli=True):
    """Field metadata the CLI reads: help text, how to parse a string, where to list it."""
    return {"help": help, "kind": kind, "group": group, "choices": choices, "flag": flag, "cli": cli}


@dataclass(frozen=True)
class Config:
    """All settings of a run. Keyword names match the CLI options (``batch_size`` is ``--batch-size``)."""

    # What to learn.
    formula: str | None = field(default=None, metadata=_opt(
        "formula to learn, e.g. 'x**2 + x' (needs --domain for each variable)", group="data"))
    domain: tuple = field(default=(), metadata=_opt(
        "NAME=LOW:HIGH sampling range of a formula variable (repeat per variable)", kind="domain", group="data"))
    data: str | None = field(default=None, metadata=_opt(
        "table to learn from: .csv, .tsv, .parquet, .npy or .npz", group="data"))
    target: tuple = field(default=(), metadata=_opt(
        "target column(s), comma-separated (default for .npy/.npz: the last column / y)", kind="strs", group="data"))
    inputs: tuple | None = field(default=None, metadata=_opt(
        "input columns, comma-separated (default: every other numeric column)", kind="strs", group="data"))
    samples: int = field(default=1000, metadata=_opt(
        "number of random points drawn from the domain for a formula", kind="int", group="data"))
    test_samples: int = field(default=10000, metadata=_opt(
        "fresh points drawn from the domain to test a formula fit", kind="int", group="data"))
    nonfinite: str = field(default="drop", metadata=_opt(
        "what to do with formula points whose value is NaN or inf", choices=NONFINITE, group="data"))

    # The network.
    hidden: tuple = field(default=(100, 100), metadata=_opt(
        "hidden layer widths, comma-separated", kind="ints", group="model"))
    activation: str = field(default="tanh", metadata=_opt(
        "activation between layers ('none' makes the network linear)", choices=ACTIVATIONS, group="model"))

    # Training.
    optimizer: str = field(default="auto", metadata=_opt(
        "optimizer; 'auto' picks by data size: full-batch L-BFGS for small data, Adam otherwise",
        choices=OPTIMIZERS))
    lr: float | None = field(default=None, metadata=_opt(
        "learning rate (default: 1 for lbfgs, 3e-3 for adam/adamw, 0.01 for sgd)", kind="float"))
    momentum: float = field(default=0.9, metadata=_opt("SGD momentum", kind="float"))
    epochs: int | None = field(default=None, metadata=_opt(
        "maximum number of epochs (default: 200 for lbfgs, enough for about 20,000 steps otherwise)",
        kind="int"))
    batch_size: int | None = field(default=None, metadata=_opt(
        "batch size (default: scaled to the data size; full batch for lbfgs)", kind="int"))
    weight_decay: float = field(default=0.0, metadata=_opt("weight decay", kind="float"))
    schedule: str = field(default="auto", metadata=_opt(
        "learning-rate schedule ('auto': onecycle for adam/adamw, none otherwise)", choices=SCHEDULES))
    val_split: float = field(default=0.1, metadata=_opt(
        "fraction of the data held out for validation", kind="float"))
    patience: int | None = field(default=None, metadata=_opt(
        "stop after this many epochs without a better validation loss (default: 20, or 10 for lbfgs)",
        kind="int"))
    time_budget: float | None = field(default=None, metadata=_opt(
        "stop training after this many seconds", kind="float"))
    grad_clip: float | None = field(default=None, metadata=_opt(
        "clip the gradient norm to this value", kind="float"))
    seed: int = field(default=0, metadata=_opt("random seed (same seed on the CPU: identical weights)", kind="int"))
    dtype: str = field(default="float32", metadata=_opt("floating-point type of the model and data", choices=DTYPES))

    # Where it runs.
    device: str = field(default="auto", metadata=_opt(
        "auto, cpu, cuda, cuda:N or mps ('auto' prefers CUDA, then MPS, then the CPU)", group="device"))

    # Output.
    out: str | None = field(default=None, metadata=_opt(
        "run folder to write (default: runs/<timestamp>)", group="output"))
    log_every: int | None = field(default=None, metadata=_opt(
        "also print the loss every N batches", kind="int", group="output"))
    plots: bool = field(default=True, metadata=_opt(
        "write fit.png and loss.png", kind="bool", group="output", flag="--no-plots"))
    quiet: bool = field(default=False, metadata=_opt("print only errors and the result", kind="bool", group="output"))
    verbose: bool = field(default=False, metadata=_opt(
        "print every epoch and more detail", kind="bool", group="output"))

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise NnfitError("invalid settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with these settings, so that they can be reported at once."""
        p = []

        def positive(name, value, integer=True):
            if value is not None and (not math.isfinite(value) or value <= 0):
                p.append(f"--{name.replace('_', '-')} must be a positive {'integer' if integer else 'number'}, got {value}")

        for name in ("samples", "test_samples", "epochs", "batch_size", "patience", "log_every"):
            positive(name, getattr(self, name))
        for name in ("lr", "time_budget", "grad_clip"):
            positive(name, getattr(self, name), integer=False)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            p.append(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            p.append(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.val_split) and 0 <= self.val_split < 1):
            p.append(f"--val-split must be in [0, 1), got {self.val_split}")
        if self.seed < 0:
            p.append(f"--seed must be 0 or more, got {self.seed}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("activation", ACTIVATIONS),
                              ("dtype", DTYPES), ("nonfinite", NONFINITE)):
            value = getattr(self, name)
            if value not in allowed:
                p.append(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.hidden or any(int(h) != h or h <= 0 for h in self.hidden):
            p.append(f"--hidden must be positive widths such as 100,100, got {','.join(map(str, self.hidden)) or 'nothing'}")
        if self.formula is not None and self.data is not None:
            p.append("--formula and --data were both given; choose one source of samples")
        if self.data is None and self.domain and self.formula is None:
            p.append("--domain was given without --formula")
        names = [d[0] for d in self.domain]
        for name in {n for n in names if names.count(n) > 1}:
            p.append(f"--domain {name} is given more than once")
        for name, low, high in self.domain:
            if not (math.isfinite(low) and math.isfinite(high)):
                p.append(f"--domain {name}={low}:{high} must have finite bounds")
            elif low == high:
                p.append(f"--domain {name}={low}:{high} is empty; give LOW < HIGH")
            elif low > high:
                p.append(f"--domain {name}={low}:{high} has reversed bounds; did you mean {name}={high}:{low}?")
        if self.quiet and self.verbose:
            p.append("--quiet and --verbose were both given; choose one")
        if self.optimizer == "lbfgs" and self.schedule not in ("auto", "none"):
            p.append(f"--schedule {self.schedule} does not apply to lbfgs; use --schedule none")
        return p

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Rebuild from ``to_dict`` output (JSON lists back to tuples); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise NnfitError(f"unknown setting(s): {', '.join(unknown)}; known settings are: {', '.join(sorted(known))}")
        return cls(**{k: normalize(k, v) for k, v in values.items()})

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **{k: normalize(k, v) for k, v in changes.items()})


def normalize(name: str, value: Any) -> Any:
    """Bring an API or JSON value into the field's canonical form (tuples, floats)."""
    kind = FIELDS[name].metadata["kind"] if name in FIELDS else "str"
    if value is None:
        return None
    if kind == "domain":
        items = value.items() if isinstance(value, dict) else [(v[0], v[1:]) for v in value]
        out = []
        for item_name, bounds in items:
            bounds = tuple(bounds)
            if len(bounds) != 2:
                raise NnfitError(f"domain of {item_name!r} must be (low, high), got {bounds}")
            out.append((str(item_name), float(bounds[0]), float(bounds[1])))
        return tuple(out)
    if kind == "strs":
        if isinstance(value, str):
            value = [v for v in value.split(",")]
        return tuple(str(v).strip() for v in value)
    if kind == "ints":
        if isinstance(value, int):
            return (value,)
        return tuple(value)
    return value


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def parse_cli_value(name: str, text: Any, problems: list[str]) -> Any:
    """Convert one CLI string for field ``name``; append a message to ``problems`` if it is bad."""
    meta = FIELDS[name].metadata
    flag = meta["flag"] or "--" + name.replace("_", "-")
    kind = meta["kind"]
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "ints":
            return tuple(int(v) for v in text.split(",") if v.strip())
        if kind == "strs":
            return tuple(v.strip() for v in text.split(",") if v.strip())
        if kind == "domain":
            return tuple(_parse_domain(item) for item in text)
    except ValueError:
        example = {"int": "an integer", "float": "a number", "ints": "integers such as 100,100",
                   "domain": "NAME=LOW:HIGH such as x=0:1"}.get(kind, "a value")
        problems.append(f"{flag} must be {example}, got {text!r}")
        return FIELDS[name].default
    return text


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
