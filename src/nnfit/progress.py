"""What a run prints: progress you can watch (a live bar on a terminal, plain lines elsewhere, nothing with
--quiet) and its result, the one text that ``nnfit train`` prints and ``fit(verbose=True)`` shows."""

from __future__ import annotations

import math
import sys
import time

ETA_AFTER = 3.0  # seconds: a fit expected to take longer than this shows how long it has left


def eta_text(elapsed: float, done: int, total: int) -> str:
    """'about 0:12 left (at most)' from the epochs so far; '' for a fit too short to need one.

    At most: early stopping or a time budget can end the fit sooner, never later.
    """
    if done <= 0 or done >= total:
        return ""
    left = elapsed / done * (total - done)
    if elapsed + left < ETA_AFTER:
        return ""
    minutes, seconds = divmod(math.ceil(left), 60)
    hours, minutes = divmod(minutes, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    return f"eta {clock} at most"


class PipeSafe:
    """A text stream (stdout, stderr) whose reader may go away (``nnfit train | head -1``): the first write
    or flush that meets the closed pipe points the stream's file descriptor at /dev/null, as Python's docs
    advise for SIGPIPE, and every later one goes there too, so that the command goes on with its work (a
    run is saved all the same) instead of dying on a progress line."""

    def __init__(self, stream):
        self.stream = stream
        self.closed_pipe = False

    def _guard(self, call, *args):
        if self.closed_pipe:
            return None
        try:
            return call(*args)
        except BrokenPipeError:
            self.closed_pipe = True
            _to_devnull(self.stream)
            return None

    def write(self, text):
        self._guard(self.stream.write, text)
        return len(text)

    def flush(self):
        self._guard(self.stream.flush)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


def _to_devnull(stream) -> None:
    import os

    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # a stream without a descriptor (pytest's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class Reporter:
    """Prints training progress to stderr. Only the main process of a run gets a live one."""

    def __init__(self, quiet: bool = False, verbose: bool = False, stream=None, live: bool | None = None,
                 results: bool | None = None, result_stream=None):
        self.stream = stream or sys.stderr
        self.quiet, self.verbose = quiet, verbose
        # The result of a fit: the CLI prints it to stdout, even with --quiet; the API shows it with verbose=True.
        self.results = verbose if results is None else results
        self.result_stream = result_stream
        self.live = (not quiet) and (self.stream.isatty() if live is None else live)
        self._bar = None
        self._last_line = 0.0
        self._last_tick = 0.0
        self._epochs = 0
        self._steps = 1
        self._started = 0.0
        self._epochs_seen = 0
        self._eta = ""

    def log(self, message: str) -> None:
        if not self.quiet:
            self._print(message)

    def _print(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=self.stream, flush=True)

    def start(self, recipe, n_train: int, n_val: int) -> None:
        self._epochs = recipe.epochs
        self._started, self._epochs_seen, self._eta = time.perf_counter(), 0, ""
        self._steps = 1 if recipe.optimizer == "lbfgs" else -(-n_train // recipe.batch_size)
        self.log(f"training on {n_train} samples, validating on {n_val}: {recipe.describe()}")
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 TextColumn("{task.fields[eta]}"),
                                 console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("", total=self._steps, epoch=1, loss="-", eta="")

    def tick(self, step: int, running_total, seen: int) -> None:
        """Called every step; redraws the bar (one host sync) at most ten times a second."""
        if self._bar is None:
            return
        now = time.perf_counter()
        if now - self._last_tick > 0.1:
            self._last_tick = now
            self._bar.update(self._task, completed=step, loss=f"{float(running_total) / seen:.3e}")

    def batch(self, epoch: int, step: int, loss) -> None:
        if not self.quiet:
            self._print(f"epoch {epoch} batch {step}: loss {float(loss.detach()):.4e}")

    def epoch(self, row: dict, improved: bool) -> None:
        # The ETA comes from wall time at epoch ends only: no host sync beyond the epoch's own.
        self._epochs_seen += 1
        self._eta = eta_text(time.perf_counter() - self._started, self._epochs_seen,
                             self._epochs_seen + self._epochs - row["epoch"])
        if self._bar is not None:
            self._bar.reset(self._task, total=self._steps, epoch=min(row["epoch"] + 1, self._epochs), loss="-",
                            eta=self._eta)
        if self.quiet:
            return
        now = time.perf_counter()
        # Fast epochs would flood the screen: print every epoch with --verbose, else at most ~2 lines a second.
        if self.verbose or row["epoch"] in (1, self._epochs) or now - self._last_line >= 0.5:
            self._last_line = now
            mark = " *" if improved else ""
            self._print(f"epoch {row['epoch']:>4}/{self._epochs}  train {row['train_loss']:.4e}  "
                        f"val {row['val_loss']:.4e}  lr {row['lr']:.2e}  {row['seconds']:.2f}s{mark}")

    def finish(self, result) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self.log(f"stopped: {result.stopped}; best epoch {result.best_epoch} "
                 f"(val loss {result.best_val_loss:.4e}), {result.seconds:.2f} s")

    def result(self, fitted, resumed: bool = False) -> None:
        if self.results and fitted.summary:
            print(result_text(fitted, hint=not (resumed or self.quiet)), file=self.result_stream or self.stream,
                  flush=True)


def metrics_table(columns: dict, per_target: dict | None = None) -> str:
    """A plain-text table: one row per metric, one column per evaluated set (and one table per target
    after it, with ``per_target``)."""
    from nnfit.report import metrics_table

    return metrics_table(columns, per_target)


def result_text(fitted, hint: bool = True) -> str:
    """The result of a fit: how it stopped, its metrics, what was written. ``hint``: the closing
    note on the tutorial's own linear network, for a run of the tutorial's exercise."""
    from nnfit.data import TUTORIAL_DOMAIN, TUTORIAL_FORMULA

    s, config = fitted.summary, fitted.config
    epochs = f"{s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}"
    lines = [f"{s['source']}: {epochs} in {s['train_seconds']:.2f} s; stopped: {s['stopped']}"]
    before = s.get("init_from", {})
    lines.append(metrics_table({"validation": s.get("validation"), "test before": before.get("test_before"),
                                "test": s.get("test")}, s.get("per_target")))
    if "test" in s:
        lines.append(f"test: {s['test_samples']} fresh points from the domain, compared with the true formula")
    if before:
        lines.append(f"started from {before['run']} (scaling {before['scaling']}); 'test before' is that model "
                     "on the same test points")
    if "frozen" in s:
        lines.append(f"frozen: {s['frozen']}")
    if s.get("oom_retries"):
        lines.append(f"out of memory {len(s['oom_retries'])} time(s): the last forward passes took "
                     f"{s['final_batch_size']} rows at a time (the optimizer's batch was unchanged)")
    if s.get("rollbacks"):
        lines.append(f"the loss became non-finite {len(s['rollbacks'])} time(s): each time the run rolled back to "
                     f"its last good state and halved the learning rate (last: {s['rollbacks'][-1]['lr']:.3g})")
    if "peak_memory" in s:
        from nnfit.devices import describe_peak

        lines.append(f"peak memory: {describe_peak(s['peak_memory'])}")
    if fitted.path is not None:
        from nnfit.runfolder import is_run_file

        written = sorted(p.name for p in fitted.path.iterdir() if is_run_file(p.name) and not p.name.startswith("."))
        lines.append(f"run folder: {fitted.path} ({', '.join(written)})")
    tutorial = config.formula == TUTORIAL_FORMULA and config.domain == TUTORIAL_DOMAIN and config.data is None
    if hint and tutorial and config.activation != "none" and not config.init_from:
        lines.append("the tutorial's own network (no activations, SGD lr 0.01, 10 epochs) stays near test MSE "
                     "6e-3: without activations it is linear. Try: nnfit train --activation none")
    return "\n".join(lines)
