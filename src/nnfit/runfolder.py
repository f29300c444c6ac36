"""Run folders: the one reader, with a schema for every file, and the one writer's rules.

Reading. ``read_run``, ``read_model``, ``read_config`` and ``read_state`` are the only ways nnfit
reads a run folder. A file is opened only if it is a regular file inside the folder (no symlink that
leaves it, no FIFO, no device), and only up to a size cap; JSON is checked field by field against the
schemas below, tensors against the architecture (names, dtypes, shapes, total size before the file is
read). Every problem is one ``NnfitError`` that names the file and the field.

Writing. A run folder has an owner: ``claim`` takes ``.nnfit.lock`` (flock) for the whole run, refuses
a folder that already holds files unless ``overwrite``, and a finished run is written into
``.nnfit-staging`` inside the folder and then moved into place (``commit``): a run that fails (a full
disk, an error, a kill) leaves the previous run whole. Files that are not nnfit's are never removed.

This module imports torch only inside the functions that need it: the CLI imports it for ``--help``.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import shutil
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from nnfit.config import ACTIVATIONS, DTYPES, FIELDS, Config
from nnfit.errors import NnfitError, NnfitWarning

FORMAT_VERSION = 1
STATE_VERSION = 1
WEIGHTS, META, CONFIG, SUMMARY, STATE = "model.safetensors", "model.json", "config.json", "summary.json", "state.json"
STATE_TENSORS = "state-[0-9][0-9][0-9][0-9][0-9][0-9].safetensors"  # a glob: state-000012.safetensors
LOCK, STAGING, COMPLETE = ".nnfit.lock", ".nnfit-staging", ".complete"
TENSORBOARD = "tb"  # RUN/tb/<run>: --tensorboard's events, written during training, one folder per run
EVENTS_NAME = r"[0-9]{8}-[0-9]{6}(-[0-9]+)?"  # <run>: when it started (new_events_name)
# Every name a training run writes in its folder, and the files `nnfit export` writes there by default.
RUN_FILES = (WEIGHTS, META, CONFIG, SUMMARY, "metrics.csv", "fit.png", "loss.png", "report.html", STATE,
             TENSORBOARD, "sweep.csv")
EXPORT_FILES = ("model.onnx", "model.pt")

JSON_LIMIT = 64 << 20  # a run's JSON files are kilobytes; state.json with a long history a few megabytes
TENSOR_LIMIT = 64 << 30  # a training state's tensors (model, optimizer, permutation) on a big machine
HEADER_SLACK = 1 << 20  # a safetensors file is its tensors' bytes plus a JSON header of ~100 bytes per tensor
MAX_WIDTH = 2**31 - 1  # a layer width, an input or output count
MAX_LAYERS = 10_000
HEX64 = re.compile(r"[0-9a-f]{64}")


def is_run_file(name: str) -> bool:
    """Whether ``name`` in a run folder is nnfit's (a run file or an export), not the user's."""
    return name in RUN_FILES or name in EXPORT_FILES or fnmatch.fnmatchcase(name, STATE_TENSORS) \
        or name in (LOCK, STAGING) or (name.startswith(".") and name.endswith(".tmp"))


# --- safe reads --------------------------------------------------------------------------------------

def read_bytes(folder, name: str, limit: int) -> bytes:
    """The bytes of ``folder/name``: a regular file inside the folder, at most ``limit`` bytes (checked
    before anything is read)."""
    folder = Path(folder)
    path = folder / name
    try:
        if os.path.islink(path):  # a link may stay inside the folder (a user's tidy-up), never leave it
            real = path.resolve()
            if not real.is_relative_to(folder.resolve()):
                raise NnfitError(f"{path} is a symbolic link to {real}, outside the run folder; nnfit reads run "
                                 "files only from inside their folder: put the file itself there")
            path = real
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NnfitError(f"{folder / name} does not exist; the run folder is incomplete") from None
    except OSError as exc:
        raise NnfitError(f"could not read {folder / name}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NnfitError(f"{folder / name} is {_kind(info.st_mode)}, not a regular file; nnfit reads only "
                             "regular files: replace it with the run's file")
        if info.st_size > limit:
            raise NnfitError(f"{folder / name} is {info.st_size:,} bytes, more than the {limit:,} this file can "
                             "hold; it is not nnfit's file")
        try:
            data = f.read(info.st_size + 1)  # +1: a file that grew past its size is noticed
        except OSError as exc:
            raise NnfitError(f"could not read {folder / name}: {exc.strerror or exc}") from None
        except MemoryError:
            raise NnfitError(f"{folder / name} is {info.st_size:,} bytes, more than this machine's memory can "
                             "hold; it is not a file this run could have written") from None
    if len(data) > min(limit, info.st_size):
        raise NnfitError(f"{folder / name} grew while it was read; is another process writing it?")
    return data


def is_regular_file(path) -> bool:
    """True for a regular file, False where nothing is; an NnfitError for anything else, which a write's
    rename would swap for a plain file (a folder, a device such as /dev/null, a FIFO). Other OSErrors (a
    permission) are the caller's to word."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(mode):
        raise NnfitError(f"{path} is {_kind(mode)}, not a regular file; nnfit writes only regular files (it "
                         "would replace it): choose a file path")
    return True


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def read_json(folder, name: str):
    data = read_bytes(folder, name, JSON_LIMIT)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = {META: "model metadata", CONFIG: "run config", SUMMARY: "run summary", STATE: "training state"}
        raise NnfitError(f"{what.get(name, 'file')} {Path(folder) / name} is not valid JSON ({exc}); the run folder "
                         "is damaged") from None
    except RecursionError:
        raise NnfitError(f"{Path(folder) / name} is nested too deeply to be nnfit's file") from None


# --- the schema ----------------------------------------------------------------------------------------
# A spec is a function (value, field path) -> value that raises Bad. Adding a field is one line in a table.

class Bad(Exception):
    def __init__(self, at: str, problem: str):
        super().__init__(f"{at} {problem}" if at else problem)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(low=None, high=None):
    def check(v, at):
        if isinstance(v, bool) or not isinstance(v, int):
            raise Bad(at, f"must be an integer, got {_show(v)}")
        if (low is not None and v < low) or (high is not None and v > high):
            raise Bad(at, f"must be {_range(low, high)}, got {v}")
        return v
    return check


def number(low=None, finite=True, positive=False):
    def check(v, at):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Bad(at, f"must be a number, got {_show(v)}")
        if finite and v != v or finite and v in (float("inf"), float("-inf")):
            raise Bad(at, f"must be a finite number, got {v}")
        if (low is not None and v < low) or (positive and not v > 0):
            raise Bad(at, f"must be {'positive' if positive else _range(low, None)}, got {v}")
        return v
    return check


def _range(low, high) -> str:
    if high is None:
        return f"{low} or more"
    return f"at most {high}" if low is None else f"between {low} and {high}"


def text(choices=None, pattern=None, nonempty=False):
    def check(v, at):
        if not isinstance(v, str):
            raise Bad(at, f"must be a string, got {_show(v)}")
        if choices is not None and v not in choices:
            raise Bad(at, f"must be one of {', '.join(choices)}, got {_show(v)}")
        if pattern is not None and not pattern.fullmatch(v):
            raise Bad(at, f"is not of the form nnfit writes, got {_show(v)}")
        if nonempty and not v:
            raise Bad(at, "must not be empty")
        return v
    return check


def boolean(v, at):
    if not isinstance(v, bool):
        raise Bad(at, f"must be true or false, got {_show(v)}")
    return v


def anything(v, at):
    return v


def optional(spec):
    def check(v, at):
        return None if v is None else spec(v, at)
    return check


def items(spec, low=0, high=None, unique=False):
    def check(v, at):
        if not isinstance(v, list):
            raise Bad(at, f"must be a list, got {_show(v)}")
        if len(v) < low or (high is not None and len(v) > high):
            raise Bad(at, f"must have {_range(low, high)} entries, got {len(v)}")
        out = [spec(x, f"{at}[{i}]") for i, x in enumerate(v)]
        if unique and len(set(map(str, out))) != len(out):
            raise Bad(at, f"must not repeat a name, got {_show(v)}")
        return out
    return check


def mapping(spec):
    """An object with any string keys, each value checked by ``spec``."""
    def check(v, at):
        if not isinstance(v, dict):
            raise Bad(at, f"must be an object, got {_show(v)}")
        return {k: spec(x, f"{at}.{k}" if at else k) for k, x in v.items()}
    return check


def record(required: dict, optional_keys: dict | None = None, extra: str = "refuse"):
    """An object with these keys. ``extra``: 'refuse' unknown keys (they could change the result) or
    'ignore' them (a newer nnfit's descriptive additions)."""
    optional_keys = optional_keys or {}

    def check(v, at):
        if not isinstance(v, dict):
            raise Bad(at, f"must be an object, got {_show(v)}")
        missing = [k for k in required if k not in v]
        if missing:
            raise Bad(at, f"is missing {', '.join(missing)}" if at else f"is missing {', '.join(missing)}")
        unknown = [k for k in v if k not in required and k not in optional_keys]
        if unknown and extra == "refuse":
            raise Bad(at, f"has field(s) {', '.join(map(str, unknown))} that this nnfit does not know (written by a "
                          "newer nnfit? upgrade nnfit to read it)")
        out = dict(v)
        for k, spec in {**required, **optional_keys}.items():
            if k in v:
                out[k] = spec(v[k], f"{at}.{k}" if at else k)
        return out
    return check


def one_of(key: str, variants: dict):
    """An object whose ``key`` picks the record that checks it."""
    def check(v, at):
        if not isinstance(v, dict):
            raise Bad(at, f"must be an object, got {_show(v)}")
        kind = v.get(key)
        if kind not in variants:
            raise Bad(f"{at}.{key}", f"must be one of {', '.join(variants)}, got {_show(kind)}")
        return variants[kind](v, at)
    return check


sha256 = text(pattern=HEX64)
width = integer(1, MAX_WIDTH)
names = items(text(nonempty=True), 1, MAX_WIDTH, unique=True)
numbers = items(number(), 1, MAX_WIDTH)

ARCHITECTURE = one_of("type", {
    "mlp": record({"type": text(), "inputs": width, "outputs": width, "hidden": items(width, 1, MAX_LAYERS),
                   "activation": text(ACTIVATIONS)},
                  {"members": integer(1, 4096)}),  # an ensemble: tensors gain a leading dimension of this size
    "custom": record({"type": text(), "class": text(nonempty=True),
                      "parameters": mapping(items(integer(0, MAX_WIDTH), 0, 64))}),
})
SCALING = record({"x_mean": numbers, "x_std": items(number(positive=True), 1, MAX_WIDTH),
                  "y_mean": numbers, "y_std": items(number(positive=True), 1, MAX_WIDTH)})
MODEL = record({
    "format_version": integer(),
    "nnfit_version": text(),
    "architecture": ARCHITECTURE,
    "dtype": text(DTYPES),
    "input_names": names,
    "target_names": names,
    "scaling": SCALING,
    "weights": record({"file": text((WEIGHTS,)), "sha256": sha256}),
}, {"frozen": items(text())})

metrics = mapping(optional(number(finite=False)))
# A rollback after a non-finite loss, and one epoch of the history, as the training loop records them.
ROLLBACK = record({"epoch": integer(1), "retry": integer(1), "lr": number(0)}, {"loss": optional(number(finite=False))},
                  extra="ignore")
EPOCH_ROW = record({"epoch": integer(1), "train_loss": number(finite=False), "val_loss": number(finite=False),
                    "lr": number(0), "seconds": number(0)}, extra="ignore")
SUMMARY_SCHEMA = record({}, {  # descriptive: what a newer nnfit adds is ignored, what nnfit reads back is checked
    "nnfit_version": text(), "source": text(), "inputs": items(text()), "targets": items(text()),
    "epochs": integer(0), "best_epoch": optional(integer(0)), "stopped": optional(text()),
    "train_seconds": number(0), "total_seconds": number(0), "parameters": integer(0),
    "validation": optional(metrics), "test": optional(metrics), "test_samples": integer(1),
    "frozen": text(), "world_size": integer(1), "precision": text(), "device": text(), "threads": integer(1),
    "tensorboard": text(pattern=re.compile(rf"{TENSORBOARD}/{EVENTS_NAME}")), "rollbacks": items(ROLLBACK),
    "samples": record({}, {"train": integer(0), "validation": integer(0)}, extra="ignore"),
    "per_target": mapping(mapping(metrics)),
    "parameter_table": items(record({"name": text(nonempty=True), "shape": items(integer(0, MAX_WIDTH), 0, 64),
                                     "numel": integer(0), "trainable": boolean,
                                     "grad_norm": optional(number(finite=False)),
                                     "moved": optional(number(finite=False))},
                                    {"unfrozen_at": integer(1)}, extra="ignore")),
}, extra="ignore")

packed = anything  # an optimizer's or schedule's state_dict, packed by checkpoint.pack; refs checked with the tensors
STATE_SCHEMA = record({
    "format_version": integer(),
    "tensors": record({"file": text(pattern=re.compile(r"state-\d{6}\.safetensors")), "sha256": sha256}),
    "config": mapping(anything),  # checked by check_config
    "position": record({"epoch": integer(0), "finished": boolean, "step": integer(0), "rows": integer(0),
                        "steps": integer(0)}),
    "optimizer": record({"state": anything, "param_groups": items(mapping(anything), 1)}),
    "history": items(EPOCH_ROW),
    "best_epoch": integer(0),
    "best_val_loss": number(finite=False),
    "rng": record({"numpy": items(anything, 4, 4), "python": items(anything, 2, 2)}),
}, {
    "nnfit_version": text(), "fingerprint": sha256, "source": text(), "custom_model": optional(text()),
    "scheduler": optional(mapping(anything)), "scaler": optional(mapping(anything)),
    "micro": optional(integer(1)), "eval_chunk": optional(integer(1)), "oom_retries": items(mapping(anything)),
    "unfrozen_at": mapping(integer(1)), "rollbacks": items(ROLLBACK), "saves": integer(1),
    "seconds": number(0), "tensorboard_run": text(pattern=re.compile(EVENTS_NAME)),
    "lr_factor": number(positive=True),  # the schedule's factor after rollbacks halved the learning rate
    "member_best": items(items(number(finite=False)), 2, 2),  # an ensemble's best epoch and loss per member
})


def checked(spec, value, where: str):
    """``value`` checked by ``spec``; a problem becomes an NnfitError that names ``where`` and the field."""
    try:
        return spec(value, "")
    except Bad as exc:
        raise NnfitError(f"{where}: {exc}; the run folder is damaged or was edited: retrain, or restore it "
                         "from a copy") from None


# Config fields are checked by their kind (the same metadata the CLI parses with): a new field needs no line here.
_KINDS: dict[str, Callable] = {
    "str": text(), "int": integer(), "float": number(finite=False), "bool": boolean,
    "ints": items(integer()), "strs": items(text()), "patterns": items(text()),
    "domain": items(lambda v, at: _domain_item(items(anything, 3, 3)(v, at), at)),
    "unfreeze": items(items(anything, 2, 2)),
    "lr_for": items(items(anything, 2, 2)),
}


def check_config(values, where: str) -> Config:
    """A Config from JSON; unknown settings are refused (a newer nnfit's setting could change the result)."""
    if not isinstance(values, dict):
        raise NnfitError(f"{where}: must be an object of settings, got {_show(values)}; the run folder is damaged")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise NnfitError(f"{where}: setting(s) {', '.join(unknown)} are unknown to this nnfit (written by a newer "
                         "nnfit? upgrade nnfit to read this run)")
    for name, value in values.items():
        spec = _KINDS.get(FIELDS[name].metadata["kind"], anything)
        checked(optional(spec), value, f"{where} field {name}")
    try:
        return Config.from_dict(values)
    except NnfitError as exc:
        raise NnfitError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise NnfitError(f"{where}: a setting has the wrong type ({exc})") from None


def _domain_item(v, at):
    text(nonempty=True)(v[0], f"{at}[0]")
    number()(v[1], f"{at}[1]")
    number()(v[2], f"{at}[2]")
    return v


# --- tensors against the architecture ------------------------------------------------------------------

def expected_tensors(meta: dict) -> dict[str, tuple] | None:
    """``{name: shape}`` of the model that ``meta`` describes, built on torch's meta device (no memory is
    allocated); None for a custom module, whose buffers are not described."""
    import torch

    from nnfit.model import parameter_count, rebuild

    arch = meta["architecture"]
    if arch["type"] != "mlp":
        return None
    count = arch.get("members", 1) * parameter_count(arch["inputs"], arch["outputs"], arch["hidden"])
    if count * 8 >= 2**62:  # counted before anything is built: torch's own size arithmetic would overflow
        raise NnfitError(f"model.json describes a network of {count:,} parameters, more than any file can hold; "
                         "the run folder was edited: retrain, or restore it from a copy")
    with torch.device("meta"):
        module = rebuild(arch)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_tensors(tensors: dict, expected: dict, dtype, where: str) -> None:
    """Names, dtypes and shapes of ``tensors`` against ``expected`` (``{name: shape}``)."""
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        raise NnfitError(f"{where} does not hold the tensors of the architecture: "
                         + "; ".join(f"{label} {', '.join(ks[:5])}" for label, ks in
                                     (("missing", missing), ("unexpected", extra)) if ks))
    for k, shape in expected.items():
        t = tensors[k]
        if t.dtype != dtype:
            raise NnfitError(f"{where}: tensor {k} has dtype {str(t.dtype).replace('torch.', '')}, but the run's "
                             f"dtype is {str(dtype).replace('torch.', '')}; the run folder was edited")
        if tuple(t.shape) != tuple(shape):
            raise NnfitError(f"{where}: tensor {k} has shape {tuple(t.shape)}, but the architecture needs "
                             f"{tuple(shape)}; the run folder was edited")


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float64": 8}[dtype]


def _safetensors(blob: bytes, where: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(blob)
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise NnfitError(f"{where} could not be read as safetensors: {exc}") from None


def _verified(folder: Path, name: str, expected_sha: str, named_in: str, limit: int, remedy: str,
              at_least: int = 0) -> dict:
    import hashlib

    blob = read_bytes(folder, name, limit)
    if hashlib.sha256(blob).hexdigest() != expected_sha:
        raise NnfitError(f"{folder / name} does not match the checksum in {folder / named_in}: the file is truncated, "
                         f"corrupted or was replaced; {remedy}")
    if len(blob) < at_least:  # e.g. a width of 1e9 in model.json: refused before any tensor is made
        raise NnfitError(f"{folder / name} is {len(blob):,} bytes, but the architecture in {named_in} needs "
                         f"{at_least:,} bytes of weights; the run folder was edited")
    return _safetensors(blob, str(folder / name))


# --- the reader ----------------------------------------------------------------------------------------

@dataclass
class Run:
    """A run folder, read and checked: the weights on the CPU, model.json, the config and the summary."""

    folder: Path
    weights: dict
    meta: dict
    config: Config
    summary: dict


def _folder(folder) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise NnfitError(f"run folder {folder} does not exist; pass the --out folder of a training run")
    if not folder.is_dir():
        raise NnfitError(f"{folder} is not a run folder; pass the folder that holds {META} and {WEIGHTS}")
    if not os.path.lexists(folder / META) and not os.path.lexists(folder / STAGING / COMPLETE):
        _not_finished(folder)
    return folder  # its readers recover an interrupted commit (_consistent)


def _not_finished(folder: Path) -> None:
    """Why a folder without model.json holds no finished run, said as what to do: wait for the process
    training into it, resume the stopped run in it, or pass one of the run folders inside it."""
    writer = _writer(folder)
    if writer is not None:
        who = f" (pid {writer})" if writer.isdigit() else ""
        raise NnfitError(f"another nnfit process{who} is writing {folder}: its run is not finished yet; wait for "
                         "that process to finish, then read the run")
    if os.path.lexists(folder / STATE):
        raise NnfitError(f"{folder} holds an unfinished run (stopped before its end, {STATE} saved), not a "
                         f"finished model; continue the stopped run with: nnfit resume {folder}")
    if os.path.lexists(folder / WEIGHTS) or os.path.lexists(folder / CONFIG):
        raise NnfitError(f"{folder / META} does not exist; the run folder is incomplete: retrain or restore it")
    runs = sorted(str(p) for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (os.path.lexists(p / META) or os.path.lexists(p / STATE)))
    inside = f"; run folders inside it: {_names(runs)}" if runs else ""
    raise NnfitError(f"{folder} is not a run folder (it has no {META}); pass the --out folder of a training "
                     f"run{inside}")


def _writer(folder: Path) -> str | None:
    """The pid (or '') of the process holding ``folder``'s lock, None if no process holds it. A shared
    lock tried and released at once: a reader never takes the writer's lock or removes its file."""
    import fcntl

    try:
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return os.pread(fd, 32, 0).decode(errors="replace").strip()
            return None
        return None  # closing the file releases the shared lock
    finally:
        os.close(fd)


def check_meta(meta, where: str) -> dict:
    """model.json (or the same fields from elsewhere): every field, and the lengths that must agree."""
    meta = checked(MODEL, meta, where)
    arch, scaling = meta["architecture"], meta["scaling"]
    n_in, n_out = len(meta["input_names"]), len(meta["target_names"])
    for key, n in (("x_mean", n_in), ("x_std", n_in), ("y_mean", n_out), ("y_std", n_out)):
        if len(scaling[key]) != n:
            raise NnfitError(f"{where}: scaling.{key} has {len(scaling[key])} values for {n} "
                             f"{'input' if key[0] == 'x' else 'target'}(s); the run folder was edited")
    if arch["type"] == "mlp" and (arch["inputs"], arch["outputs"]) != (n_in, n_out):
        raise NnfitError(f"{where}: architecture has {arch['inputs']} input(s) and {arch['outputs']} output(s), "
                         f"but input_names and target_names name {n_in} and {n_out}; the run folder was edited")
    return meta


def read_model(folder) -> tuple[dict, dict]:
    """(weights on the CPU, model.json) of a run folder, every field and tensor checked."""
    return _consistent(_read_model, _folder(folder))


def _consistent(read: Callable, folder: Path):
    """``read(folder)``, all of one run even while a writer commits another into the folder: a read during
    which a commit ran (model.json replaced, or a commit marker present) is done again once the commit has
    finished, whether it failed (one run's model.json, the next run's weights) or not (one run's weights,
    the next run's config). Readers take no lock: a writer holds the folder's lock for its whole run, and a
    commit is a few renames, model.json last."""
    for _ in range(5):
        recover(folder)  # waits for a commit in progress
        before = _identity(folder / META)
        try:
            result, error = read(folder), None
        except NnfitError as exc:
            result, error = None, exc
        if not _commit_meanwhile(folder, before):
            if error is not None:
                raise error
            return result
    raise NnfitError(f"{folder} kept changing while it was read: another nnfit process keeps saving runs into "
                     "it; read it once that process has finished")


def _identity(path: Path):
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _commit_meanwhile(folder: Path, before) -> bool:
    """Whether a commit ran into ``folder`` since model.json was ``before``, or is running now."""
    return os.path.lexists(folder / STAGING / COMPLETE) or _identity(folder / META) != before


def _read_model(folder: Path) -> tuple[dict, dict]:
    raw = read_json(folder, META)
    if isinstance(raw, dict) and raw.get("format_version") != FORMAT_VERSION:
        raise NnfitError(f"{folder / META} has format version {_show(raw.get('format_version'))}, but this nnfit "
                         f"reads version {FORMAT_VERSION} (saved by nnfit {raw.get('nnfit_version', '?')})")
    meta = check_meta(raw, str(folder / META))
    import torch

    expected = expected_tensors(meta)
    shapes = expected.values() if expected is not None else meta["architecture"]["parameters"].values()
    nbytes = sum(_numel(s) for s in shapes) * _itemsize(meta["dtype"])
    limit = nbytes + HEADER_SLACK + 256 * len(shapes) if expected is not None else TENSOR_LIMIT
    weights = _verified(folder, WEIGHTS, meta["weights"]["sha256"], META, limit, "retrain or restore the run folder",
                        at_least=nbytes if expected is not None else 0)
    dtype = getattr(torch, meta["dtype"])
    if expected is not None:
        check_tensors(weights, expected, dtype, str(folder / WEIGHTS))
    else:
        params = {k: tuple(v) for k, v in meta["architecture"]["parameters"].items()}
        check_tensors({k: v for k, v in weights.items() if k in params}, params, dtype, str(folder / WEIGHTS))
    frozen = [n for n in meta.get("frozen", []) if n not in weights]
    if frozen:
        raise NnfitError(f"{folder / META}: frozen names {', '.join(frozen)}, which the weights do not hold")
    return weights, meta


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def read_config(folder, name: str = CONFIG) -> Config:
    folder = Path(folder)
    return check_config(read_json(folder, name), str(folder / name))


def check_summary(summary, where: str, weight_names=None) -> dict:
    summary = checked(SUMMARY_SCHEMA, summary, where)
    if weight_names is not None:
        unknown = [r["name"] for r in summary.get("parameter_table", []) if r["name"] not in weight_names]
        if unknown:
            raise NnfitError(f"{where}: parameter_table names {', '.join(unknown[:5])}, which the weights do not "
                             "hold; the run folder was edited")
    return summary


def read_run(folder) -> Run:
    """Everything ``nnfit.load`` and ``inspect`` need from a finished run folder, checked: all of one run,
    even while a writer commits another into the folder."""
    return _consistent(_read_run, _folder(folder))


def _read_run(folder: Path) -> Run:
    weights, meta = _read_model(folder)
    config = read_config(folder)
    _check_config_fits(config, meta, str(folder / CONFIG))
    summary = check_summary(read_json(folder, SUMMARY), str(folder / SUMMARY), weights) \
        if os.path.lexists(folder / SUMMARY) else {}
    return Run(folder, weights, meta, config, summary)


def _check_config_fits(config: Config, meta: dict, where: str) -> None:
    """A formula run's config.json must describe the model's inputs (its domain) and its one target:
    evaluate draws test points from it."""
    names = [entry[0] for entry in config.domain or ()]
    if config.formula is not None and names and set(names) != set(meta["input_names"]):
        raise NnfitError(f"{where}: the domain names {', '.join(names)}, but the model's inputs are "
                         f"{', '.join(meta['input_names'])}; the run folder was edited: retrain, or restore it from a copy")
    if config.formula is not None and len(meta["target_names"]) != 1:
        raise NnfitError(f"{where}: a formula gives one target, but the model has {len(meta['target_names'])}; the "
                         "run folder was edited: retrain, or restore it from a copy")


def read_packed(packed: dict, where: str) -> Run:
    """A pickled ``nnfit.Regressor``'s model (``sklearn._pack``), through the same checks as a run folder."""
    import hashlib

    blob = packed["weights"]
    fields = {k: packed.get(k) for k in ("architecture", "dtype", "input_names", "target_names", "scaling")}
    meta = check_meta({**fields, "format_version": FORMAT_VERSION, "nnfit_version": "",
                       "weights": {"file": WEIGHTS, "sha256": hashlib.sha256(blob).hexdigest()}}, where)
    expected = expected_tensors(meta)
    if expected is not None and len(blob) > sum(map(_numel, expected.values())) * _itemsize(meta["dtype"]) \
            + HEADER_SLACK + 256 * len(expected):
        raise NnfitError(f"{where}: its weights are larger than its architecture needs")
    weights = _safetensors(blob, where)
    import torch

    if expected is not None:
        check_tensors(weights, expected, getattr(torch, meta["dtype"]), where)
    config = check_config(packed.get("config"), f"{where} field config")
    summary = check_summary(packed.get("summary") or {}, f"{where} field summary", weights)
    return Run(Path("."), weights, meta, config, summary)


def read_state(folder) -> tuple[dict, dict]:
    """(tensors on the CPU, state.json) of an unfinished run, every field and tensor reference checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NnfitError(f"run folder {folder} does not exist" if not folder.exists() else
                         f"{folder} is not a run folder; pass the --out folder of a training run")
    recover(folder)
    if not os.path.lexists(folder / STATE):
        if os.path.lexists(folder / WEIGHTS):
            raise NnfitError(f"{folder} has no training state to resume ({STATE}): the run finished and "
                             f"{WEIGHTS} is its result; start a new run with nnfit train to train more")
        raise NnfitError(f"{folder} has no training state ({STATE}): the run was stopped before its first "
                         "checkpoint, or this is not a run folder; start it again with nnfit train")
    where = str(folder / STATE)
    raw = read_json(folder, STATE)
    if isinstance(raw, dict) and raw.get("format_version") != STATE_VERSION:
        raise NnfitError(f"{where} has format version {_show(raw.get('format_version'))}, but this nnfit reads "
                         f"training states of version {STATE_VERSION} "
                         f"(saved by nnfit {raw.get('nnfit_version', '?')}); "
                         "resume it with that nnfit, or start again")
    info = checked(STATE_SCHEMA, raw, where)
    config = check_config(info["config"], f"{where} field config")
    tensors = _verified(folder, info["tensors"]["file"], info["tensors"]["sha256"], STATE, TENSOR_LIMIT,
                        "the training state cannot be used: start the run again")
    _check_state_tensors(tensors, info, config, where)
    return tensors, info


def _check_state_tensors(tensors: dict, info: dict, config: Config, where: str) -> None:
    import torch

    def bad(problem):
        raise NnfitError(f"{where}: {problem}; the training state cannot be used: start the run again")

    if not any(k.startswith("model/") for k in tensors):
        bad("its tensor file holds no model")
    for prefix in ("best/", "start/"):
        for k in (k for k in tensors if k.startswith("model/")):
            other = tensors.get(prefix + k[len("model/"):])
            if prefix == "best/" and other is not None and other.shape != tensors[k].shape:
                bad(f"tensor {prefix}{k[6:]} has shape {tuple(other.shape)}, model/{k[6:]} {tuple(tensors[k].shape)}")
    dtype = getattr(torch, config.dtype)
    for k, t in tensors.items():
        if k.split("/")[0] in ("model", "best", "start") and t.dtype != dtype:
            bad(f"tensor {k} has dtype {str(t.dtype).replace('torch.', '')}, but the run trains in {config.dtype}")
    for k, dt, shape in (("rng/torch", torch.uint8, None), ("rng/generator", torch.uint8, None),
                         ("rng/numpy", torch.int64, (624,)), ("rng/python", torch.int64, (625,))):
        t = tensors.get(k)
        if t is None or t.dtype != dt or t.ndim != 1 or (shape is not None and tuple(t.shape) != shape):
            bad(f"the random-number state {k} is missing or malformed")
    for k in (k for k in tensors if k.startswith("rng/cuda/")):
        if tensors[k].dtype != torch.uint8 or tensors[k].ndim != 1:
            bad(f"the random-number state {k} is malformed")
    name, pos, has_gauss, cached = info["rng"]["numpy"]
    if name != "MT19937" or isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= 624 \
            or has_gauss not in (0, 1) or not isinstance(cached, (int, float)):
        bad(f"rng.numpy is malformed, got {_show(info['rng']['numpy'])}")
    version, gauss = info["rng"]["python"]
    if version != 3 or not (gauss is None or isinstance(gauss, (int, float))):
        bad(f"rng.python is malformed, got {_show(info['rng']['python'])}")
    position = info["position"]
    if not position["finished"]:
        perm, total = tensors.get("perm"), tensors.get("total")
        # An ensemble's epoch has one permutation per member, (K, n), and a running loss per member, (K,).
        members = config.ensemble
        shape = (1, 1) if members == 1 else (2, members)
        if perm is None or total is None or perm.dtype != torch.int64 or perm.ndim != shape[0] or \
                (perm.ndim == 2 and len(perm) != members) or total.numel() != shape[1]:
            bad("position is in the middle of an epoch, but the epoch's permutation or running loss is missing")
        n = perm.shape[-1]
        if position["rows"] > n:
            bad(f"position.rows {position['rows']} is beyond the epoch's {n} rows")
        if perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= n):
            bad("the epoch's permutation holds rows outside the training set")
    refs = []
    _refs(info.get("optimizer"), refs)
    _refs(info.get("scheduler"), refs)
    _refs(info.get("scaler"), refs)
    missing = [r for r in refs if not isinstance(r, str) or r not in tensors]
    if missing:
        bad(f"it refers to tensor(s) {', '.join(map(_show, missing[:3]))} that its tensor file does not hold")


def _refs(obj, out: list) -> None:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            out.append(obj["__tensor__"])
            return
        for v in obj.values():
            _refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _refs(v, out)


def build_module(weights: dict, meta: dict, model=None, where: str = "the run"):
    """The module ``meta`` describes (or the caller's ``model``), with the weights loaded and the frozen
    parameters marked, in the saved dtype on the CPU."""
    import torch

    from nnfit.model import rebuild

    from nnfit.model import instantiate

    arch = meta["architecture"]
    if arch["type"] == "mlp":
        module = rebuild(arch)
    elif model is None:
        raise NnfitError(f"{where} was trained with a custom module ({arch['class']}); "
                         "pass a fresh instance: nnfit.load(path, model=YourModule(...))")
    else:
        module = instantiate(model)  # an instance, or a class built without arguments, as fit accepts
        if not isinstance(module, torch.nn.Module):
            raise NnfitError(f"model= must be a torch.nn.Module (or its class), got {type(module).__name__}; "
                             "pass a fresh instance: nnfit.load(path, model=YourModule(...))")
    module = module.to(dtype=getattr(torch, meta["dtype"]))
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise NnfitError(f"the weights in {where} do not fit the model: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    named = dict(module.named_parameters())
    for name in meta.get("frozen", []):
        if name in named:
            named[name].requires_grad_(False)
    return module


# --- the writer: an owner, a lock, a commit ----------------------------------------------------------

class Claim:
    """Ownership of a run folder while a run writes it (a context manager).

    Takes ``.nnfit.lock`` with flock (released when the process exits, however it exits), so a second
    writer fails at once. A folder that holds anything is refused unless ``overwrite`` (or ``resume``,
    which continues the state in it). On a failure before anything was written, a folder that was new
    or empty is removed again.
    """

    def __init__(self, out, overwrite: bool = False, resume: bool = False):
        self.folder = Path(out)
        self.overwrite, self.resume = overwrite, resume
        self.created = False
        self.fd: int | None = None

    def __enter__(self) -> "Claim":
        folder = self.folder
        if os.path.lexists(folder) and not folder.is_dir():
            raise NnfitError(f"--out {folder} is a file, not a folder; choose a folder for the run")
        if not folder.exists():
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                pass
            except OSError as exc:
                raise NnfitError(f"could not create the run folder {folder}: {exc.strerror or exc}") from None
        self.created = not any(folder.iterdir())  # new, or reserved empty by the CLI's default --out
        self.fd = _lock(folder)
        try:
            _finish_commit(folder)
            if not self.resume:
                self._check_contents()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _check_contents(self) -> None:
        folder = self.folder
        present = sorted(p.name for p in folder.iterdir() if p.name not in (LOCK, STAGING))
        if not present:
            return
        ours = [n for n in present if is_run_file(n)]
        theirs = [n for n in present if not is_run_file(n)]
        if not self.overwrite:
            what = []
            if ours:
                what.append(f"a run ({_names(ours)})")
            if theirs:
                what.append(f"{len(theirs)} other file(s) ({_names(theirs)})")
            stopped = f", or continue the stopped run in it with: nnfit resume {folder}" if STATE in ours else ""
            raise NnfitError(f"--out {folder} already holds {' and '.join(what)}; nnfit never overwrites a run "
                             "folder silently: pass --overwrite to replace the run (files that are not nnfit's "
                             f"are kept), or choose another --out{stopped}")
        for name in ours:
            mode = os.lstat(folder / name).st_mode
            if not (stat.S_ISREG(mode) or (name == TENSORBOARD and stat.S_ISDIR(mode))):
                raise NnfitError(f"{folder / name} is {_kind(mode)}, not a regular file; nnfit replaces only "
                                 "its own regular files: move it away first")
        if theirs:
            warnings.warn(f"--overwrite: {folder} also holds {_names(theirs)}, which nnfit did not write; "
                          "they are kept", NnfitWarning, stacklevel=2)

    def __exit__(self, exc_type, exc, tb):
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # a commit cut short is finished, a staging without its marker dropped
            _finish_commit(self.folder)
        _unlock(self.folder, self.fd)
        self.fd = None
        if exc_type is not None and self.created:
            with contextlib.suppress(OSError):  # nothing was written: leave no empty folder behind
                self.folder.rmdir()


def _names(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


class Held(NnfitError):
    """The folder's lock is held by another process (a writer)."""


def _lock(folder: Path) -> int:
    """An open, flock-ed ``.nnfit.lock``. The file is removed when its holder is done (``_unlock``), so after
    the lock is taken it must still be the file at that path; otherwise take the new one."""
    for _ in range(100):
        fd = _try_lock(folder)
        try:
            same = os.path.samestat(os.stat(folder / LOCK, follow_symlinks=False), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise NnfitError(f"could not lock {folder / LOCK}: it keeps being replaced")


def _unlock(folder: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(folder / LOCK)  # still held: a process waiting on this file sees it is gone and retries
    os.close(fd)


def _try_lock(folder: Path) -> int:
    import fcntl

    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise NnfitError(f"could not create the lock file {path}: {exc.strerror or exc}; "
                         "the run folder must be writable") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NnfitError(f"{path} is not a regular file; remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise Held(f"another nnfit process{who} is writing to {folder}; wait for it to finish, or write "
                             "this run to another folder with --out") from None
        raise NnfitError(f"could not lock {path}: {exc.strerror or exc}") from None
    return fd


@contextlib.contextmanager
def staged(folder):
    """A fresh ``.nnfit-staging`` folder inside ``folder`` to write a finished run into; ``commit`` moves it
    into place. If the body fails, the staging folder is removed and ``folder`` is as it was."""
    stage = Path(folder) / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def commit(folder, keep=()) -> None:
    """Move the staged files into ``folder``, model.json last, then remove the run files of a previous run
    that this one did not write (``keep``: what this run wrote directly, such as ``tb/<run>``, whose
    siblings in ``tb`` are a previous run's and go too) and any training state. A marker written first lets
    the next reader or writer finish a commit that a crash cut short."""
    from nnfit.checkpoint import atomic_write_bytes

    folder = Path(folder)
    stage = folder / STAGING
    names = sorted((p.name for p in stage.iterdir()), key=lambda n: (n == META, n))
    atomic_write_bytes(stage / COMPLETE, json.dumps({"files": names, "keep": list(keep)}).encode())
    _finish_commit(folder)


def _finish_commit(folder: Path) -> None:
    """Complete a commit whose marker is written (all new files are whole); drop a staging folder without one,
    or one that is not nnfit's (a link, a marker that is not a regular file or not a plan nnfit writes)."""
    from nnfit.checkpoint import fsync_dir

    stage = folder / STAGING
    try:
        if not stat.S_ISDIR(os.lstat(stage).st_mode):  # a link or a file in the staging folder's place
            _drop_staging(stage)
            return
    except FileNotFoundError:
        return
    try:
        plan = _commit_plan(json.loads(read_bytes(stage, COMPLETE, 1 << 16)), stage, folder)
    except (NnfitError, ValueError):
        _drop_staging(stage)  # an unfinished write (or not nnfit's): the previous run is untouched
        return
    kept = [PurePosixPath(k).parts for k in plan["keep"]]
    written = set(plan["files"]) | {parts[0] for parts in kept}
    for name in plan["files"]:
        if os.path.lexists(stage / name):
            try:
                os.replace(stage / name, folder / name)
            except OSError as exc:
                raise NnfitError(f"could not finish saving the run in {folder}: moving {stage / name} into place "
                                 f"failed ({exc.strerror or exc}); move {stage} out of the folder, then retry") from None
    for p in list(folder.iterdir()):
        if p.name in written or p.name in (LOCK, STAGING) or not is_run_file(p.name):
            continue
        _remove(p)
    for parts in kept:  # tb/<run>: what else is in tb is an earlier run's
        events = folder / TENSORBOARD
        if len(parts) == 2 and events.is_dir() and not events.is_symlink():
            for p in list(events.iterdir()):
                if p.name != parts[1]:
                    _remove(p)
    fsync_dir(folder)
    _drop_staging(stage)


def _drop_staging(stage: Path) -> None:
    _remove(stage)
    if os.path.lexists(stage):
        raise NnfitError(f"could not remove {stage}, a save of the run that did not finish; remove it by hand "
                         "(the run's own files are untouched)")


def _commit_plan(plan, stage: Path, folder: Path) -> dict:
    """The commit marker's plan, checked, or ValueError: ``files`` are run files' plain names (nothing outside
    the folder is ever moved or removed), among them the model, each a regular file in the staging folder
    or already moved into the run folder; ``keep`` is ``tb`` or ``tb/<run>``."""
    if not (isinstance(plan, dict) and isinstance(plan.get("files"), list) and isinstance(plan.get("keep"), list)):
        raise ValueError("not a commit plan")
    for name in plan["files"]:
        if not (isinstance(name, str) and name == Path(name).name and is_run_file(name)):
            raise ValueError(f"not a run file's name: {name!r}")
        staged = os.path.lexists(stage / name)
        if (staged and not stat.S_ISREG(os.lstat(stage / name).st_mode)) or \
                (not staged and not os.path.lexists(folder / name)):
            raise ValueError(f"{name!r} is not a staged file")
    if not {META, WEIGHTS} <= set(plan["files"]):  # every save stages the model
        raise ValueError("a plan without the model")
    for name in plan["keep"]:
        if not (isinstance(name, str) and re.fullmatch(rf"{TENSORBOARD}(/{EVENTS_NAME})?", name)):
            raise ValueError(f"not a kept name: {name!r}")
    return plan


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def new_events_name(out) -> str:
    """A name for a new run's folder in RUN/tb: the time now (20261127-235901), or with -2, -3, ... the
    first such name not yet there (a run replaced within the same second)."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = (stamp if i == 1 else f"{stamp}-{i}" for i in range(1, 10 ** 6))
    return next(name for name in names if not os.path.lexists(Path(out) / TENSORBOARD / name))


def check_free(folder) -> None:
    """Raise at once if another process is writing ``folder`` (its claim is taken later, by ``fit``)."""
    if os.path.lexists(Path(folder) / LOCK):
        _unlock(Path(folder), _lock(Path(folder)))


def recover(folder: Path, wait: float = 30.0) -> None:
    """Finish a commit that a crash interrupted, if its writer is gone (readers call this); while its writer
    is finishing it, wait for that (up to ``wait`` seconds: a commit is a few renames)."""
    import time

    deadline = time.monotonic() + wait
    while os.path.lexists(folder / STAGING / COMPLETE):
        try:
            fd = _lock(folder)
        except Held:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
            continue
        try:
            _finish_commit(folder)  # finishes the commit or drops the staging folder, or raises
        finally:
            _unlock(folder, fd)
        return


# --- writes outside a run folder ------------------------------------------------------------------------

def check_output(path, allowed=()) -> None:
    """Refuse an output file (predict --out, export --out) that is one of a run folder's own files."""
    path = Path(path)
    parent = path.resolve().parent if path.parent.exists() else path.parent
    name = path.name
    is_run = any(os.path.lexists(parent / n) for n in (META, STATE, LOCK))
    if is_run and is_run_file(name) and name not in allowed:
        raise NnfitError(f"--out {path} is a file of the run folder {parent} ({name}); writing it would break the "
                         "run: choose a file outside the run's own files")


def check_new_file(path, overwrite: bool, data=None, export: bool = False) -> None:
    """An output file (predict --out, export --out): never the input table ``data``, never one of a run
    folder's own files (an export's own file excepted, as without --out), never anything but a regular
    file, and an existing file only with ``overwrite``."""
    path = Path(path)
    if data is not None and os.path.exists(path) and os.path.exists(data) and os.path.samefile(path, data):
        raise NnfitError(f"--out {path} is the --data file {data}; writing it would replace your inputs: choose "
                         f"another --out, e.g. {path.with_name(path.stem + '-pred' + path.suffix)}")
    allowed = EXPORT_FILES if export else ()
    check_output(path, allowed)
    try:
        if not is_regular_file(path):
            return
    except OSError as exc:
        raise NnfitError(f"could not check --out {path}: {exc.strerror or exc}; choose another --out") from None
    parent = path.resolve().parent
    if path.name in allowed and any(os.path.lexists(parent / n) for n in (META, STATE)):
        return  # a run's own export, written again as nnfit export RUN does without --out
    if not overwrite:
        raise NnfitError(f"--out {path} already exists; nnfit never overwrites a file silently: pass --overwrite "
                         "to replace it, or choose another --out")
