"""The training state: what exact resume and the rollback after a divergence restore.

A ``State`` holds tensors (model, optimizer state, best weights, RNG states, the epoch's
permutation, the running loss) and JSON-able data (position, learning-rate factor, history, early stopping,
freeze state). ``Saver`` decides when to write it and turns SIGINT/SIGTERM into a saved stop.
Nothing is pickled: tensors go to safetensors and the rest to JSON (``checkpoint.write_state``).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nnfit import checkpoint, devices, runfolder
from nnfit.errors import NnfitError, TrainingInterrupted

DEFAULT_MIN_SECONDS = 1.0  # without --checkpoint-every: at most one epoch-end save per second
ECHO_SECONDS = 0.5  # the same signal again this soon is the launcher forwarding it, not a second Ctrl-C


@dataclass
class State:
    """One training state: tensors for safetensors, everything else for JSON."""

    tensors: dict
    info: dict
    # The run's history list that info["history"] copies (not saved): a later capture ``into`` this state
    # copies only the rows appended to that list since (rows are never changed once appended).
    history_of: list | None = field(default=None, repr=False, compare=False)

    @property
    def position(self) -> dict:
        """``epoch``, ``finished`` (the epoch ended), ``step`` and ``rows`` done in it, ``steps`` in the run."""
        return self.info["position"]

    def describe(self) -> str:
        p = self.position
        return f"the end of epoch {p['epoch']}" if p["finished"] else f"epoch {p['epoch']} step {p['step']}"


def capture(model, optimizer, lr_factor: float, plan, generator, result, best_state, start_values, position: dict,
            perm=None, total=None, into: State | None = None, unchanged=()) -> State:
    """A copy of everything the loop needs to continue exactly from ``position``. The learning rate is a
    function of ``position["steps"]`` and ``lr_factor`` (halved by each rollback): no scheduler state.

    ``into``: an earlier state of the same run, owned by the caller, whose tensors become this copy's
    buffers when every one still matches in name, shape, dtype and device: one foreach copy per device
    and dtype, no allocation (the state at every epoch's end, which a divergence rolls back to). Its
    tensors are overwritten: nothing else may hold on to it. ``unchanged``: the prefixes ("best",
    "start") whose values are what ``into`` already holds, not copied again.
    """
    live: dict = {}  # the run's own tensors: copied
    info = {
        "position": dict(position),
        "optimizer": checkpoint.pack(optimizer.state_dict(), "optimizer", live),
        "lr_factor": lr_factor,
        "scaler": checkpoint.pack(plan.scaler.state_dict(), "scaler", live) if plan.scaler is not None else None,
        "micro": plan.micro,
        "eval_chunk": plan.eval_chunk,
        "oom_retries": [dict(r) for r in plan.guard.retries],
        "history": _history(result.history, into),
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "member_best": [list(result.member_best_epochs), list(result.member_best_val_losses)],  # an ensemble's
        "unfrozen_at": dict(result.unfrozen_at),
        "rollbacks": [dict(r) for r in result.rollbacks],
    }
    fresh: dict = {}  # made here for this state (the RNG states): nothing else holds them, no copy needed
    info["rng"] = _rng_info(fresh)
    # keep_vars: the parameters themselves, not a detach() (one operation each) of every one
    for prefix, state in (("model", model.state_dict(keep_vars=True)), ("best", best_state), ("start", start_values)):
        live.update({f"{prefix}/{k}": v for k, v in state.items()})
    fresh["rng/torch"] = torch.get_rng_state()
    fresh["rng/generator"] = generator.get_state()
    device = getattr(plan, "device", None)
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        # The run's own device's generator only (under DDP each rank's is its device's; the state rank 0
        # saves would otherwise hold every GPU's as rank 0's process sees them).
        index = _cuda_index(device)
        fresh[f"rng/cuda/{index}"] = torch.cuda.get_rng_state(index)
    if perm is not None:
        live["perm"] = perm
    if total is not None:
        live["total"] = total
    return State({**_copied(live, into, unchanged), **fresh}, info, result.history)


def _history(history: list, into: State | None) -> list:
    """Copies of the history's rows: only of those appended since ``into`` was taken from the same list (a
    restore replaces the list), so that an epoch's end does not copy every earlier epoch's row again."""
    if into is None or into.history_of is not history:  # the loop only appends to its list
        return [dict(row) for row in history]
    kept = into.info["history"]
    return [*kept, *(dict(row) for row in history[len(kept):])]


def _copied(live: dict, into: State | None, unchanged) -> dict:
    """Private copies of ``live``'s tensors: into ``into``'s where they all fit, else new ones."""
    buffers = into.tensors if into is not None else {}
    if buffers and all(k in buffers and _fits(buffers[k], v) for k, v in live.items()):
        copy_into([buffers[k] for k in live if k.partition("/")[0] not in unchanged],
                  [v for k, v in live.items() if k.partition("/")[0] not in unchanged])
        return {k: buffers[k] for k in live}
    return {k: v.detach().clone() for k, v in live.items()}


def _fits(buffer: torch.Tensor, value: torch.Tensor) -> bool:
    return buffer.shape == value.shape and buffer.dtype == value.dtype and buffer.device == value.device


@torch.no_grad()
def copy_into(buffers: list, values: list) -> None:
    """``buffers[i].copy_(values[i])`` for all i, as one ``torch._foreach_copy_`` per (device, dtype):
    on a GPU one multi-tensor kernel instead of a launch per tensor. No autograd: a buffer never joins
    a parameter's graph."""
    groups: dict = {}
    for b, v in zip(buffers, values, strict=True):
        key = (b.device, b.dtype, v.device, v.dtype)
        bs, vs = groups.setdefault(key, ([], []))
        bs.append(b)
        vs.append(v)
    for bs, vs in groups.values():
        torch._foreach_copy_(bs, vs)


def _rng_info(tensors: dict) -> dict:
    """numpy's and Python's global RNG states: the long key arrays as tensors, the rest as JSON."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    tensors["rng/python"] = torch.tensor(internal, dtype=torch.int64)
    return {"numpy": [name, pos, has_gauss, cached], "python": [version, gauss_next]}


def part(state: State, prefix: str, like: dict | None = None) -> dict:
    """The tensors saved under ``prefix/``: a state_dict, copied (the optimizer updates its state in place).

    A state read from disk holds CPU tensors. With ``like`` (the live model's ``state_dict()``) each
    tensor is copied to the device of the live tensor of the same name, so that a restore keeps every
    tensor where the model is (a resumed GPU run compares its frozen weights on the GPU).
    """
    start = prefix + "/"
    like = like or {}
    out = {}
    for key, value in state.tensors.items():
        if key.startswith(start):
            name = key[len(start):]
            out[name] = value.to(like[name].device, copy=True) if name in like else value.clone()
    return out


def unpacked(state: State, key: str):
    """The optimizer's or scaler's state_dict, with copies of its tensors: of those under ``key/`` only
    (copying the model's, the best and the start weights too would double the state's memory at a rollback)."""
    value = state.info.get(key)
    start = key + "/"
    return None if value is None else checkpoint.unpack(
        value, {k: v.clone() for k, v in state.tensors.items() if k.startswith(start)})


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def restore_rng(state: State, generator: torch.Generator, device: torch.device | None = None, note=None) -> None:
    """The RNG states back as ``state`` saved them; on CUDA, ``device``'s generator only. ``note`` (a log
    line) says when the saved CUDA state cannot be restored, e.g. a state saved with every GPU's generator
    (before nnfit saved one) resumed on a machine with another number of GPUs."""
    torch.set_rng_state(state.tensors["rng/torch"])
    generator.set_state(state.tensors["rng/generator"])
    cuda = {int(k.rpartition("/")[2]): state.tensors[k] for k in state.tensors if k.startswith("rng/cuda/")}
    if device is not None and device.type == "cuda":
        index = _cuda_index(device)
        # one saved state: the run's own generator, whichever GPU it was on; several (older runs): this GPU's
        saved = next(iter(cuda.values())) if len(cuda) == 1 else cuda.get(index)
        if saved is not None:
            torch.cuda.set_rng_state(saved, index)
        elif note is not None:
            note(f"resume: the saved CUDA random-number state ({len(cuda)} GPU generators) does not fit "
                 f"{device}; its generator continues from its own state (random draws on the GPU differ)")
    name, pos, has_gauss, cached = state.info["rng"]["numpy"]
    np.random.set_state((name, state.tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = state.info["rng"]["python"]
    random.setstate((version, tuple(state.tensors["rng/python"].tolist()), gauss_next))


def load(folder) -> State:
    """The saved training state of a run folder, every field verified (``runfolder.read_state``)."""
    return State(*runfolder.read_state(folder))


# Stopping on SIGINT and SIGTERM.

class StopRequest:
    """Set by the signal handlers; the loop reads ``signal`` once per step (a Python attribute: no host sync).

    ``phase`` names what the process is doing (``phase()``); in a ``deferred`` phase a signal is recorded
    and acted on when the work in progress is complete, in any other it stops the process at once."""

    signal: int | None = None
    since: float = 0.0  # when it came (time.monotonic())
    phase: str = ""
    deferred: bool = False
    kept: object = ""  # what a stop in this phase leaves behind, for the message (see ``phase``)


STOP = StopRequest()  # process-wide, as signal handlers are


@contextlib.contextmanager
def handling_signals(echo_seconds: float = 0.0):
    """While active, SIGINT and SIGTERM stop the process with ``TrainingInterrupted`` (exit 130 or 143):
    at once outside deferred phases, else when the phase's work is done (training saves its state at the
    next step); a second signal stops at once. Only in the main thread (as Python requires); the CLI
    uses it, a library caller may.

    In a worker, a repeat of the same signal within ``echo_seconds`` (``ECHO_SECONDS``) is not a second
    one: a launcher (``--devices N``, torchrun) forwards the Ctrl-C that the terminal also sent to it."""
    def handler(signum, frame):
        if STOP.signal == signum and time.monotonic() - STOP.since < echo_seconds:
            return
        if STOP.signal is not None:  # the second one: no more waiting for the step to end
            raise stopped_at_once(signum)
        STOP.signal, STOP.since = signum, time.monotonic()
        if not STOP.deferred:
            raise _stopped(signum, STOP.phase, STOP.kept)

    try:
        with on_stop_signals(handler):
            yield
    finally:
        STOP.signal = None


@contextlib.contextmanager
def phase(name: str, deferred: bool = False, kept=""):
    """Name what the process is doing, for the line a stop signal prints; ``kept`` (a text, or a function
    that returns one when the signal comes) says what a stop leaves behind. In a ``deferred`` phase
    (training, which polls ``STOP`` and saves its state; saving a run, whose files must be complete) a
    signal waits for the phase to end; in any other phase it stops the process at once, and an atomic
    write in progress removes its temporary file."""
    outer = STOP.phase, STOP.deferred, STOP.kept
    if STOP.signal is not None and not deferred:  # a signal deferred by an enclosing phase: stop now
        raise _stopped(STOP.signal, STOP.phase, STOP.kept)
    STOP.phase, STOP.deferred, STOP.kept = name, deferred, kept
    try:
        yield
    finally:
        STOP.phase, STOP.deferred, STOP.kept = outer
    if STOP.signal is not None and deferred:  # it came during the phase, which has now done its work
        raise _stopped(STOP.signal, f"{name} (finished first)", kept)


def _stopped(signum: int, doing: str, kept) -> TrainingInterrupted:
    kept = kept() if callable(kept) else kept
    return TrainingInterrupted(f"{signal.Signals(signum).name}{' while ' + doing if doing else ''}: stopped"
                               f"{'; ' + kept if kept else ''}", 128 + signum)


def stopped_at_once(signum: int) -> TrainingInterrupted:
    """What a second SIGINT or SIGTERM raises: stop now, without saving."""
    return TrainingInterrupted(f"{signal.Signals(signum).name} again: stopped at once, without saving",
                               128 + signum, at_once=True)


@contextlib.contextmanager
def on_stop_signals(handler):
    """``handler`` for SIGINT and SIGTERM while active, the previous handlers after. Python installs
    signal handlers only in the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Saver:
    """When the training state is written (every ``every`` steps and at epoch ends), and where.

    Only the main process writes. ``capture(position, perm, total)`` is set by the loop. With
    ``together`` (DDP) a signal stops only at an epoch end, when the ranks have agreed on it in the
    epoch's all-reduce and the loop has set ``agreed``: otherwise one rank would wait for the others.
    """

    def __init__(self, folder, every: int | None, is_main: bool = True, info: dict | None = None,
                 resume: State | None = None, together: bool = False):
        self.folder = Path(folder) if folder else None
        self.every = every
        self.write_here = self.folder is not None and is_main
        self.info = dict(info or {})
        self.resume = resume
        self.saves = resume.info.get("saves", 0) if resume is not None else 0
        self.steps = resume.position.get("steps", 0) if resume is not None else 0  # steps of the whole run
        self._process_steps = 0
        self._kill_at = devices.fault("kill-at-step")
        self._last_write = -math.inf
        self.capture = None
        self.epoch = 0
        self.perm = None
        self.together = together
        self.agreed: int | None = None  # the signal all ranks stop for (set by the loop under DDP)

    def _requested(self) -> int | None:
        return self.agreed if self.together else STOP.signal

    def step(self) -> bool:
        """Count a step; True when a checkpoint is due or a stop was requested (no host sync)."""
        self.steps += 1
        self._process_steps += 1
        if self._process_steps == self._kill_at:  # NNFIT_FAULT=kill-at-step:N
            devices.kill_self()
        return (self.every is not None and self.steps % self.every == 0) or self._requested() is not None

    def mid_epoch(self, step: int, rows: int, total: torch.Tensor) -> None:
        position = {"epoch": self.epoch, "finished": False, "step": step, "rows": rows, "steps": self.steps}
        if self._requested() is not None:
            self._stop(self.capture(position, self.perm, total))
        # A running loss that is already NaN must not overwrite the last good state: the epoch's end rolls back.
        if self.write_here and bool(torch.isfinite(total).all()):  # the checkpoint's one host sync
            self.write(self.capture(position, self.perm, total))

    def epoch_end(self, state: State) -> None:
        if self._requested() is not None:
            self._stop(state)
        due = self.every is not None or time.perf_counter() - self._last_write >= DEFAULT_MIN_SECONDS
        if self.write_here and due:
            self.write(state)

    def position(self, epoch: int) -> dict:
        return {"epoch": epoch, "finished": True, "step": 0, "rows": 0, "steps": self.steps}

    def write(self, state: State) -> None:
        try:  # state.json holds the config: config.json is written with the finished run (runfolder.commit)
            checkpoint.write_state(self.folder, state.tensors, {**self.info, **state.info, "saves": self.saves + 1},
                                   self.saves + 1)
        except NnfitError as exc:
            kept = (f"the last training state is intact: free some space, then continue with nnfit resume "
                    f"{self.folder}") if self.saves else "no training state had been saved yet"
            raise NnfitError(f"{exc}; {kept}") from None
        self.saves += 1
        self._last_write = time.perf_counter()

    def _stop(self, state: State) -> None:
        signum = self._requested()
        name = signal.Signals(signum).name
        if self.write_here:
            self.write(state)
        if self.folder is None:
            how = "there is no run folder (out=...), so nothing was saved"
        else:  # every rank says what rank 0 does: each worker of torchrun prints it
            how = f"the training state is saved in {self.folder}; continue with: nnfit resume {self.folder}"
        raise TrainingInterrupted(f"{name}: training stopped at {state.describe()}; {how}", 128 + signum)
