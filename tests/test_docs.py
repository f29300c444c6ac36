"""Every example in README.md and docs/*.md runs, and the numbers they quote are what the commands print.

Each ```sh, ```console and ```python block is run, in the order of its file, in one temporary folder per
file (so that a later example can use the run folder an earlier one wrote), with the tables the examples
read created first. Examples added to the docs are picked up without touching this file.

Size knobs are scaled down by SUBSTITUTIONS (and SMALL appended to training commands), so that the whole
file runs in seconds; nothing else in a command changes. A command that cannot run here is listed in
NOT_RUN with the reason, and that list is asserted to stay small. The quoted numbers of the demo and the
fine-tuning example are checked in the tests at the end by running the documented commands unchanged.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nnfit.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(sh|console|python)\n(.*?)^```", re.M | re.S)

# (pattern, replacement): the size knobs of the examples, scaled down. Nothing else is rewritten.
SUBSTITUTIONS = [
    (r"--samples \d+", "--samples 300"),
    (r"--test-samples \d+", "--test-samples 500"),
    (r"--epochs \d+", "--epochs 3"),
    (r"--patience \d+", "--patience 3"),
    (r"--unfreeze-at \d+:", "--unfreeze-at 2:"),  # stays before the last epoch of the scaled-down run
    (r"--devices [3-9]\d*", "--devices 2"),
    (r"--nproc-per-node \d+", "--nproc-per-node 2"),
    (r"--checkpoint-every \d+", "--checkpoint-every 20"),
    (r"--min-batch-size \d+", "--min-batch-size 16"),
    (r"\bsamples=\d+", "samples=300"),
    (r"\bepochs=\d+", "epochs=3"),
    (r"\bunfreeze_at=\{\d+:", "unfreeze_at={2:"),
    (r"^make demo\b", "nnfit demo"),  # make demo = set up .venv, then nnfit demo (Makefile)
]
# Appended to every `nnfit train` and `nnfit demo` that does not set them, and given to every `nnfit.fit` call
# of a Python example that does not set them: a few epochs, fewer test points, and no plots (drawing them is
# 80% of a small run's time; tests/test_report.py tests them).
SMALL = {"--epochs": "3", "--test-samples": "500", "--no-plots": None}
# A command that the docs say to interrupt ("press Ctrl-C midway") gets SIGINT once training has started,
# and more epochs, so that it is still training when the signal comes.
INTERRUPTED_EPOCHS = "50"

# Commands not run, by how they start, with the reason.
NOT_RUN = {
    "make test": "runs this test suite itself",
    "pip install": "installs packages; CI's setup (make setup-dev) installs every extra",
    "python bench/": "benchmarks take minutes each and time the machine; tests/test_bench_smoke.py runs bench/core.py",
    "torchrun --nnodes": "needs several machines",
    "tensorboard --logdir": "starts a web server that runs until it is stopped",
    "python -m webbrowser": "opens a browser",
}


# Python examples that show the Python form of the shell command just before them, which already did the work.
ALTERNATIVES = {
    "reliability.md:12": "nnfit.resume('runs/long') is the Python form of the `nnfit resume runs/long` above it",
}


def test_not_run_list_stays_small():
    assert len(NOT_RUN) <= 6 and len(ALTERNATIVES) <= 2


def _tables(folder: Path) -> None:
    """The files the examples read: measurements with inputs a, b, c and target y, and the other formats."""
    rng = np.random.default_rng(0)

    def measurements(n):
        a, b, c = rng.uniform(0, 1, (3, n))
        return pd.DataFrame({"a": a, "b": b, "c": c, "y": a * b + np.sin(c)})

    data = measurements(300)
    data.to_csv(folder / "measurements.csv", index=False)
    data.to_parquet(folder / "measurements.parquet", index=False)
    measurements(100).to_csv(folder / "test.csv", index=False)
    measurements(400).to_parquet(folder / "big.parquet", index=False)
    measurements(400).to_parquet(folder / "huge.parquet", index=False)
    two = data.assign(y1=data.y, y2=data.a - data.c).drop(columns="y")
    two.to_csv(folder / "two_outputs.tsv", sep="\t", index=False)
    X = rng.uniform(0, 1, (300, 2))
    np.savez(folder / "arrays.npz", X=X, y=X[:, 0] * X[:, 1])
    np.save(folder / "matrix.npy", np.column_stack([X, X.sum(axis=1)]))
    pd.DataFrame({"x": [0.1, 0.5, 0.9]}).to_csv(folder / "new.csv", index=False)


def _commands(kind: str, body: str):
    """(command, interrupt, expected output or None) for each command of a shell or console block."""
    if kind == "console":
        chunks = re.split(r"^\$ ", body, flags=re.M)[1:]
        for chunk in chunks:
            command, _, output = chunk.partition("\n")
            yield command, False, output.strip()
        return
    lines = body.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if not words:
            if commands and re.search(r"Ctrl-C|killed", line):  # "# ... killed, Ctrl-C ..." after a command
                commands[-1][1] = True
            continue
        commands.append([shlex.join(words), "Ctrl-C" in line, None])
    yield from (tuple(c) for c in commands)


def _substitute(text: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text, flags=re.M)
    return text


def _argv(command: str, interrupt: bool) -> list[str]:
    argv = shlex.split(_substitute(command))
    if argv[:1] == ["python"] and argv[1:3] == ["-m", "nnfit"]:
        argv = ["nnfit", *argv[3:]]
    if argv[:2] in (["nnfit", "train"], ["nnfit", "demo"]) or (argv[:1] == ["torchrun"] and "train" in argv):
        extra = {**SMALL, "--epochs": INTERRUPTED_EPOCHS} if interrupt else SMALL
        for flag, value in extra.items():
            if flag not in argv:
                argv += [flag] if value is None else [flag, value]
    return argv


def _run_nnfit(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv[1:])
        except SystemExit as exc:  # --help, --version
            code = exc.code or 0
    return code, out.getvalue()


def _run_interrupted(argv: list[str], folder: Path) -> tuple[int, str]:
    """Start the command, send SIGINT once training has started, as the docs tell the reader to."""
    proc = subprocess.Popen([sys.executable, "-m", "nnfit", *argv[1:]], cwd=folder, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("training on"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return (0 if proc.returncode == 130 else proc.returncode or 1), "".join(seen) + out + err


def _run_external(argv: list[str], folder: Path) -> tuple[int, str]:
    exe = Path(sys.executable).parent / argv[0]
    argv = [str(exe) if exe.exists() else argv[0], *argv[1:]]
    if argv[0] == "python":
        argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _blocks(doc: Path):
    text = doc.read_text()
    for match in BLOCK.finditer(text):
        yield f"{doc.name}:{text[:match.start()].count(chr(10)) + 1}", match.group(1), match.group(2)


def _small_fit(fit):
    def small(*args, **kwargs):
        if kwargs.get("config") is None:
            kwargs = {"epochs": int(SMALL["--epochs"]), "test_samples": int(SMALL["--test-samples"]), "plots": False,
                      **kwargs}
        return fit(*args, **kwargs)

    return small


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_example_runs(doc, tmp_path, monkeypatch):
    import nnfit.api

    monkeypatch.setattr(nnfit.api, "fit", _small_fit(nnfit.api.fit))  # SMALL for the Python examples
    monkeypatch.chdir(tmp_path)
    _tables(tmp_path)
    ran = 0
    namespace = {"__name__": "__main__"}  # a file's Python examples are one story: later ones use earlier names
    for where, kind, body in _blocks(doc):
        if kind == "python" and where in ALTERNATIVES:
            continue
        if kind == "python":
            code = _substitute(body)
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    exec(compile(code, where, "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"{where}: the Python example failed: {type(exc).__name__}: {exc}\n{code}\n{out.getvalue()}")
            ran += 1
            continue
        for command, interrupt, expected in _commands(kind, body):
            if any(command.startswith(prefix) for prefix in NOT_RUN):
                continue
            argv = _argv(command, interrupt)
            if interrupt:
                code, output = _run_interrupted(argv, tmp_path)
            elif argv[0] == "nnfit":
                code, output = _run_nnfit(argv)
            else:
                code, output = _run_external(argv, tmp_path)
            if expected is not None:  # a console block: the documented output, error or not
                assert output.strip() == expected, f"{where}: {command}\ndocumented:\n{expected}\nprinted:\n{output}"
                continue
            assert code == 0, f"{where}: `{command}` (run as {shlex.join(argv)}) exited {code}:\n{output[-3000:]}"
            ran += 1
    assert ran or doc.name == "benchmarks.md"  # benchmarks.md shows output only


# --- the numbers the docs quote ------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?")
FACTOR = 3.0  # an error metric may differ by this factor: L-BFGS lands on other weights with another CPU's arithmetic


def _text_block_after(doc: Path, marker: str) -> str:
    text = doc.read_text()
    start = text.index(marker)
    return text[start:].split("```text\n", 1)[1].split("```", 1)[0]


def _shape(line: str) -> str:
    return NUMBER.sub("#", line).strip()


def _close(documented: float, measured: float, r2: bool) -> bool:
    if r2:  # compare the unexplained share, 1 - R², which is what an error metric is
        documented, measured = 1 - documented, 1 - measured
        if documented < 1e-4 and measured < 1e-4:
            return True
    if documented <= 0 or measured <= 0:
        return documented == measured
    return abs(math.log(measured / documented)) <= math.log(FACTOR)


def _check_quoted(block: str, printed: str, where: str) -> None:
    """Every documented line is printed, with the same words; the metric rows' numbers agree within FACTOR."""
    printed_lines = {_shape(line): line for line in printed.splitlines()}
    for line in block.strip().splitlines():
        if line.strip() in ("...", ""):
            continue
        assert _shape(line) in printed_lines, f"{where}: documented line not printed:\n{line}\nprinted:\n{printed}"
        metric = line.split("  ")[0]
        if metric in ("MSE", "RMSE", "MAE", "R²", "max abs error"):
            documented = [float(v) for v in NUMBER.findall(line)]
            measured = [float(v) for v in NUMBER.findall(printed_lines[_shape(line)])]
            assert all(_close(d, m, metric == "R²") for d, m in zip(documented, measured)), \
                f"{where}: the documented {metric} {documented} is not what the command prints now: {measured}"


def test_demo_output_is_what_nnfit_demo_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, printed = _run_nnfit(["nnfit", "demo"])
    assert code == 0, printed
    block = _text_block_after(ROOT / "README.md", "`make demo` prints")
    _check_quoted(block, printed, "README.md demo output")


def test_fine_tuning_numbers_are_what_the_commands_print(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = []
    for command in ('nnfit train --formula "x**2 + x" --domain x=0:1 --out runs/base',
                    'nnfit train --formula "x**2 + x" --domain x=1:2 --init-from runs/base --freeze l1 --out runs/tuned'):
        for doc in (ROOT / "README.md", ROOT / "docs" / "freezing.md"):
            assert command in " ".join(doc.read_text().split()), f"{doc.name} no longer shows {command}"
        code, printed = _run_nnfit(shlex.split(command))
        assert code == 0, printed
        outputs.append(printed)
    _check_quoted(_text_block_after(ROOT / "README.md", "nnfit inspect runs/tuned\n```"), outputs[1], "README.md")
    _check_quoted(_text_block_after(ROOT / "docs" / "freezing.md", "--init-from runs/base --freeze l1 --out runs/tuned"),
                  outputs[1], "docs/freezing.md")
    prose = re.search(r"test MSE on \[1, 2\] from (\d+(?:\.\d+)?(?:e-?\d+)?) to (\d+(?:\.\d+)?(?:e-?\d+)?)",
                      (ROOT / "docs" / "freezing.md").read_text())
    summary = __import__("json").loads((tmp_path / "runs" / "tuned" / "summary.json").read_text())
    assert _close(float(prose.group(1)), summary["init_from"]["test_before"]["mse"], False)
    assert _close(float(prose.group(2)), summary["test"]["mse"], False)
