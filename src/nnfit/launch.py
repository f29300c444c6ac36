"""``--devices N``: start N local workers that train together with DistributedDataParallel.

The workers are spawned with ``torch.multiprocessing``. Each one gets the environment torchrun
would give it (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) and runs
the ordinary ``nnfit.fit``, which joins the process group. When a worker fails, the others are
stopped at once and the run fails with that worker's message: it never hangs. SIGINT and SIGTERM
are forwarded to the workers, which agree to save and stop at the next epoch end; the run then stops
with rank 0's message and exit code (130 or 143). A second signal stops the workers at once.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from nnfit import devices, trainstate
from nnfit.errors import NnfitError, NnfitWarning, TrainingInterrupted

GRACE_SECONDS = 5.0  # after one worker fails, how long the others get to exit before they are killed


def run_workers(fn, args: tuple, n: int) -> None:
    """Run ``fn(rank, *args)`` in ``n`` spawned workers of one process group; wait for all of them.

    Raises:
        NnfitError: a worker failed; it names the worker and its message. The others are stopped.
    """
    port = devices.free_port()
    with tempfile.TemporaryDirectory(prefix="nnfit-workers-") as errors:
        workers = mp.start_processes(_worker, args=(fn, args, n, port, errors), nprocs=n, join=False,
                                     start_method="spawn")
        received: list = []
        try:
            with _forwarding_signals(workers.processes, received):
                # join() returns as soon as any worker fails, and then stops the rest.
                while not workers.join(grace_period=GRACE_SECONDS):
                    pass
        except ProcessException as exc:
            if received:  # e.g. a worker that was still starting: its signal stopped it unsaved
                name = signal.Signals(received[0]).name
                raise TrainingInterrupted(f"{name}: {_failure(exc, n, errors)}", 128 + received[0]) from None
            raise NnfitError(_failure(exc, n, errors)) from None
        except KeyboardInterrupt:
            for process in workers.processes:
                if process.is_alive():
                    process.kill()
            raise
        stops = sorted(Path(errors).glob("*.stop"), key=lambda p: int(p.stem))
        if stops:  # the workers stopped together: say it once, as rank 0 did
            code, message = stops[0].read_text().split(" ", 1)
            raise TrainingInterrupted(message, int(code))


def _forwarding_signals(processes, received: list):
    """The first SIGINT or SIGTERM goes on to the workers (a Ctrl-C that the terminal also sent them
    counts once there, see ``trainstate.handling_signals``); a second one stops them at once."""

    def handler(signum, frame):
        if received:
            raise trainstate.stopped_at_once(signum)
        received.append(signum)
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    return trainstate.on_stop_signals(handler)


def _worker(rank: int, fn, args: tuple, n: int, port: int, errors: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n))
    if rank == 0:
        warnings.showwarning = _show_warning
    try:
        with trainstate.handling_signals(trainstate.ECHO_SECONDS):
            fn(rank, *args)
    except TrainingInterrupted as exc:
        Path(errors, f"{rank}.stop").write_text(f"{exc.exit_code} {exc}")
        # Saved: exit 0, so that join() waits for rank 0 to finish writing. At once: stop the others too.
        sys.exit(exc.exit_code if exc.at_once else 0)
    except NnfitError as exc:  # the user's mistake: one line, as in a single process
        Path(errors, f"{rank}.txt").write_text(exc.args[0])  # unrendered: the parent renders it
        sys.exit(2)
    except Exception:
        traceback.print_exc()  # a bug: the traceback goes to the terminal, the parent names the worker
        raise


def _failure(exc: ProcessException, n: int, errors: str) -> str:
    rank = exc.error_index
    message = Path(errors, f"{rank}.txt")
    if message.exists():
        return f"worker {rank} of {n}: {message.read_text()}"
    if isinstance(exc, mp.ProcessRaisedException):
        last = next((line for line in reversed(exc.msg.strip().splitlines()) if line.strip()), "an error")
        return (f"worker {rank} of {n} failed with {last.strip()} (its traceback is above); "
                "the other workers were stopped")
    how = f"was killed by signal {exc.signal_name}" if getattr(exc, "signal_name", None) \
        else f"exited with code {exc.exit_code}"
    hint = " (its error is above; from a script, the call to fit must be under 'if __name__ == \"__main__\":')" \
        if getattr(exc, "exit_code", None) == 1 else ""
    return f"worker {rank} of {n} {how}{hint}; the other workers were stopped"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, NnfitWarning):
        print(f"nnfit: warning: {getattr(message, 'cli_message', message.__str__)()}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def fit_in_workers(config, frame, model):
    """``fit`` with ``--devices N``: N workers train, rank 0 writes the run folder, and the model
    is loaded from it here, on the CPU, without DDP."""
    from nnfit.api import load
    from nnfit.model import instantiate

    _check_main_guard(config.devices)
    devices.parse_devices(config.device, config.devices)  # too many GPUs: say so before starting anyone
    scratch = None if config.out else tempfile.mkdtemp(prefix="nnfit-run-")
    out = config.out or scratch
    try:
        run_workers(_fit_worker, (config.replace(out=out, plots=config.plots and scratch is None), frame, model),
                    config.devices)
        fitted = load(out, model=instantiate(model) if model is not None else None)
        fitted.history = _read_history(Path(out) / "metrics.csv")
        fitted.config = fitted.config.replace(out=config.out, plots=config.plots)  # as the run's rank 0 had it
        if scratch is not None:
            fitted.path = None
        return fitted
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


MAIN_GUARD = ("fit(devices={n}) starts {n} worker processes, and each one imports your script {script} again; "
              "without a guard they run it from the top and call fit again. Put the code that calls fit under "
              "'if __name__ == \"__main__\":' (see docs/distributed.md)")


def _check_main_guard(n: int) -> None:
    """A script that calls fit(devices=N) at its top level, with no ``if __name__ == "__main__":``, would
    have every spawned worker run it again: say what is missing instead of "worker 1 exited with code 1"."""
    import inspect
    import multiprocessing

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # a worker importing the script
        raise NnfitError(MAIN_GUARD.format(n=n, script=script or ""))
    if not script or not script.endswith(".py") or not os.path.exists(script):
        return
    called_from_top = any(f.frame.f_globals is vars(main) and f.function == "<module>" for f in inspect.stack())
    with open(script, encoding="utf-8", errors="replace") as f:
        guarded = "__main__" in f.read()
    if called_from_top and not guarded:
        raise NnfitError(MAIN_GUARD.format(n=n, script=script))


def _fit_worker(rank: int, config, frame, model) -> None:
    from nnfit.api import _fit_here
    from nnfit.progress import Reporter

    # The launcher holds the run folder's claim, and it shows the result, once.
    _fit_here(config, frame, model, Reporter(quiet=config.quiet, verbose=config.verbose, results=False))


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]
