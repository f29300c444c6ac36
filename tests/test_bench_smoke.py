"""bench/core.py runs end to end and prints its tables (a smoke run: no timing is asserted)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_bench_quick_prints_its_tables():
    # One thread: this checks the script, not the machine, and must not fight the test suite for cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "core.py"), "--quick"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "time to test MSE <= 1e-5" in out
    nnfit_row = next(line for line in out.splitlines() if line.startswith("| nnfit (default recipe)"))
    # The default recipe reaches the target even in the quick run: a time in seconds, not "> budget".
    assert nnfit_row.split("|")[2].strip().endswith(" s") and ">" not in nnfit_row.split("|")[2]
    rates = [line for line in out.splitlines() if line.startswith(("| 64 ", "| 1024 "))]
    assert len(rates) == 2 and all(line.split("|")[-2].strip().endswith("x") for line in rates), out


def test_ensemble_bench_quick_prints_its_tables():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ensemble.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    speed = [line for line in out.splitlines() if line.startswith("| cpu ")]
    assert len(speed) == 2 and all(line.split("|")[5].strip().endswith("x") for line in speed), out
    spread = [line for line in out.splitlines() if line.startswith(("| x**2 + x ", "| sin(3*x)*exp(-x) "))]
    assert len(spread) == 2 and all(line.split("|")[7].strip().endswith("x") for line in spread), out


def test_threads_bench_quick_prints_one_row_per_case_with_nnfits_choice():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "threads.py"), "--quick"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 1 ")]
    assert len(rows) == 3, proc.stdout
    # The tutorial network at batch 64 is below the one-thread limit, at batch 256 above it; the demo's
    # full-batch L-BFGS (900 rows) keeps one thread.
    assert [row[-1].strip() for row in rows] == ["1", "free cores", "1"], proc.stdout
    assert all(row[3].strip().endswith("µs") and row[4].strip().endswith("µs") for row in rows), proc.stdout


def test_sweep_bench_quick_prints_both_sweeps_against_the_default_run():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep.py"), "--quick", "--device", "cpu",
                           "--threads", "1"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    default = next(line for line in lines if line.startswith("| one default run")).split("|")[1:-1]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| sweep: ")]
    assert len(rows) == 2, proc.stdout
    for cells in rows:
        assert cells[1].strip() == "12" and float(cells[3]) > 0 and cells[6].strip() in ("yes", "no")
        assert float(cells[7]) > 0
    # The networks sweep lists the default configuration: its yardstick run is the timed default run itself.
    assert rows[0][7] == default[4], proc.stdout


def test_patience_bench_quick_prints_both_rules_for_each_case():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "patience.py"), "--quick"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith(("| sin(a)", "| x**2"))]
    assert [row[2].strip() for row in rows] == ["--patience 20 (before)", "default: every epoch"] * 2, proc.stdout
    assert all(float(row[6]) >= 0 for row in rows), proc.stdout
