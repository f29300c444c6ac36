"""Shared pieces of the benchmark scripts: the cases, the machine's load, subprocess workers, tables.

Every tool runs in its own process (``python bench/X.py --worker TOOL ...``) so that one tool's
imports, threads and allocator state never touch another's. A worker prints one JSON line that
starts with ``RESULT``; the parent collects them and prints the tables.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

HIDDEN = (100, 100)
ACTIVATION = "tanh"
TUTORIAL = {"lr": 1e-3, "batch_size": 32}  # the tutorial's recipe, given to every peer
TEST_SAMPLES = 10_000


def _uniform(rng, n, bounds):
    return np.column_stack([rng.uniform(lo, hi, n) for lo, hi in bounds])


def _formula_case(f, bounds):
    def make(n, seed):
        X = _uniform(np.random.default_rng(seed), n, bounds)
        return X, f(X)
    return make


def _friedman(k):
    def make(n, seed):
        from sklearn import datasets

        return getattr(datasets, f"make_friedman{k}")(n_samples=n, noise=0.0, random_state=seed)
    return make


# name -> (description, sample maker(n, seed) -> (X, y), training samples)
CASES = {
    "tutorial": ("x**2 + x on [0, 1]", _formula_case(lambda X: X[:, 0] ** 2 + X[:, 0], [(0, 1)]), 1000),
    "friedman1": ("make_friedman1, 10 inputs", _friedman(1), 10_000),
    "friedman2": ("make_friedman2, 4 inputs", _friedman(2), 10_000),
    "friedman3": ("make_friedman3, 4 inputs", _friedman(3), 10_000),
    "smooth": ("exp(-(a²+b²)/2) + 0.5 c, on [-2, 2]³",
               _formula_case(lambda X: np.exp(-(X[:, 0] ** 2 + X[:, 1] ** 2) / 2) + 0.5 * X[:, 2], [(-2, 2)] * 3),
               10_000),
    "oscillating": ("sin(3a) cos(3b) + 0.3 sin(5c), on [-pi, pi]³",
                    _formula_case(lambda X: np.sin(3 * X[:, 0]) * np.cos(3 * X[:, 1]) + 0.3 * np.sin(5 * X[:, 2]),
                                  [(-math.pi, math.pi)] * 3), 10_000),
    "steep": ("tanh(20 (a - b²)) + 0.2 c, on [-1, 1]³",
              _formula_case(lambda X: np.tanh(20 * (X[:, 0] - X[:, 1] ** 2)) + 0.2 * X[:, 2], [(-1, 1)] * 3),
              10_000),
}


def case_data(name: str, seed: int = 0):
    """Training and test arrays (float64, y of shape (n, 1)); test points are fresh draws."""
    _, make, n = CASES[name]
    X, y = make(n, seed)
    Xt, yt = make(TEST_SAMPLES, seed + 1_000_003)
    return (np.asarray(X, np.float64), np.asarray(y, np.float64).reshape(-1, 1),
            np.asarray(Xt, np.float64), np.asarray(yt, np.float64).reshape(-1, 1))


class Standardizer:
    """The peers get the same courtesy nnfit gives itself: standardized inputs and targets."""

    def __init__(self, X, y):
        self.xm, self.xs = X.mean(0), X.std(0)
        self.ym, self.ys = y.mean(0), y.std(0)

    def x(self, X):
        return ((X - self.xm) / self.xs).astype(np.float32)

    def y(self, y):
        return ((y - self.ym) / self.ys).astype(np.float32)

    def unscale(self, y):
        return np.asarray(y, np.float64).reshape(-1, 1) * self.ys + self.ym


class Clock:
    """Training time with evaluations excluded: ``pause()`` / ``resume()`` around each test."""

    def __init__(self):
        self.spent = 0.0
        self._since = time.perf_counter()

    def pause(self) -> float:
        self.spent += time.perf_counter() - self._since
        self._since = None
        return self.spent

    def resume(self) -> None:
        self._since = time.perf_counter()

    def now(self) -> float:
        return self.spent + (time.perf_counter() - self._since if self._since is not None else 0.0)


def time_to(trace, target):
    """First training time at which the test MSE in ``trace`` [(seconds, mse), ...] is <= target."""
    return next((t for t, mse in trace if mse <= target), None)


def load_report() -> str:
    """The 1-minute load average, printed with every table so that a busy machine shows in the numbers."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load unknown"
    return f"load average {load:.2f} on {os.cpu_count()} cores"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def run_worker(script: str, args: list[str], timeout: float) -> dict:
    """Run ``script --worker ...`` in a fresh process; return its RESULT payload or the error."""
    cmd = [sys.executable, script, *args]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["process_seconds"] = time.perf_counter() - started
            return out
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:200]}"}


def emit(payload: dict) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


def keeping_lines(lines: list):
    """A quiet nnfit reporter that appends the run's log lines to ``lines`` (whether the step was captured
    as a CUDA graph, and in how long)."""
    from nnfit.progress import Reporter

    class Keep(Reporter):
        def log(self, message):
            lines.append(message)
    return Keep(quiet=True)


def table(header: list[str], rows: list[list], title: str = "") -> str:
    """A Markdown table (readable in a terminal and pasteable into docs/benchmarks.md)."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [f"\n{title}\n" if title else "", line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def fmt_s(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f} s" if seconds < 1 else f"{seconds:.2f} s"


def fmt_e(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2e}"
