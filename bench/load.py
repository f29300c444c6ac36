"""Training time on a busy machine: the default thread choice against --threads 1 and --threads 2.

    python bench/load.py              # 3 repeats of each, quiet and with one busy process
    python bench/load.py --repeats 5
    python bench/load.py --quick      # 1 repeat of a smaller fit (a smoke run)

Each fit is `nnfit train --formula "sin(3*x)*exp(-x)" --domain x=0:3 --samples 5000` in a fresh process;
the time is the training time the run records (summary.json's train_seconds), the median over the
repeats. "busy" runs one extra process that spins on one core for the whole measurement. The target:
busy, the default takes at most 1.3x the better of --threads 1 and --threads 2; quiet, it is no slower
than --threads 2 (what the default chose before it looked at the load).

Other processes on the machine add their own load: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_report, machine, table  # noqa: E402

FIT = ["--formula", "sin(3*x)*exp(-x)", "--domain", "x=0:3", "--samples", "5000"]
QUICK = [*FIT, "--epochs", "3"]
CHOICES = {"default": [], "--threads 1": ["--threads", "1"], "--threads 2": ["--threads", "2"]}
# One busy core; it stops by itself when this script is gone (killed before it could stop it).
SPIN = ("import os, time\nparent, end = os.getppid(), time.time() + 3600\n"
        "while time.time() < end and os.getppid() == parent:\n    pass\n")


def train_once(fit: list[str], extra: list[str]) -> tuple[float, str]:
    """One fit in a fresh process: (training seconds, the run's 'threads:' line or '')."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.run([sys.executable, "-m", "nnfit", "train", *fit, *extra, "--no-plots", "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"nnfit train {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
        seconds = json.loads((out / "summary.json").read_text())["train_seconds"]
    line = next((l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("threads:")), "")
    return seconds, line


def measure(fit: list[str], repeats: int) -> tuple[dict[str, float], str]:
    """Median training seconds per choice; the choices take turns so that a change in load hits all of them."""
    times = {name: [] for name in CHOICES}
    lines = []
    for _ in range(repeats):
        for name, extra in CHOICES.items():
            seconds, line = train_once(fit, extra)
            times[name].append(seconds)
            if name == "default":
                lines.append(line.removeprefix("threads: "))
    return {name: statistics.median(v) for name, v in times.items()}, "; ".join(dict.fromkeys(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fits per choice and condition (default 3)")
    parser.add_argument("--quick", action="store_true", help="one repeat of a smaller fit")
    args = parser.parse_args()
    fit, repeats = (QUICK, 1) if args.quick else (FIT, args.repeats)
    print(f"machine: {machine()}\n")
    command = " ".join(f'"{a}"' if "(" in a else a for a in fit)
    print(f"`nnfit train {command}`: training seconds, median of {repeats} run(s) per cell\n")
    rows = []
    for condition in ("quiet", "busy"):
        spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if condition == "busy" else None
        try:
            load_before = load_report()
            medians, chosen = measure(fit, repeats)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        best = min(medians["--threads 1"], medians["--threads 2"])
        ratio = medians["default"] / best
        if condition == "busy":
            verdict = f"{'met' if ratio <= 1.3 else 'missed'} (≤ 1.3x)"
        else:
            ratio_old = medians["default"] / medians["--threads 2"]
            verdict = f"{ratio_old:.2f}x of --threads 2 (the old default)"
        rows.append(["one busy process added" if spinner else "no load added",
                     *(f"{medians[name]:.2f} s" for name in CHOICES), f"{ratio:.2f}x", verdict, chosen,
                     load_before])
        # The table so far, after each condition: on a loaded machine the busy half can take long.
        print(table(["machine", *CHOICES, "default ÷ best", "target", "default chose", "load at start"], rows,
                    title=f"after {len(rows)} of 2 conditions:"), flush=True)


if __name__ == "__main__":
    main()
