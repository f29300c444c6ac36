"""Every subcommand and every option of the CLI, given odd values: exit 0 or 2, never a traceback.

The options are read from the parser itself, so that a new option is fuzzed without editing this file.
Training stays tiny: each example starts from small --samples/--test-samples/--epochs, which a fuzzed
option may override only with an odd value, never a merely large valid one.
"""

import argparse
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnfit.cli import build_parser, main

TINY = ["--samples", "40", "--test-samples", "40", "--epochs", "2", "--no-plots", "--quiet"]
# --help, --help-all and --version exit through argparse; --debug shows tracebacks
SKIP = {"help", "version", "debug"}
SKIP_FLAGS = {"--help-all"}
ODD = ["--", "", " ", "-", "-1", "0", "1.5", "nan", "-inf", "1e400", "9" * 40, "-" + "9" * 40, "x" * 300,
       "é∂ƒ☃", "\u200b", "x=0:1", "x=1:0", "l1", "5:l1", "l1=0.01", "a,b,,c", "/proc/nope/x", ".", "cuda:99"]


def _options():
    """(subcommand, positional run folder?, [(flag, takes a value, choices)]) for every subcommand."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = []
    for name, p in sub.choices.items():
        positional = any(not a.option_strings for a in p._actions)
        flags = [(a.option_strings[-1], a.nargs != 0, tuple(a.choices or ()))
                 for a in p._actions if a.option_strings and a.dest not in SKIP
                 and not SKIP_FLAGS & set(a.option_strings)]
        commands.append((name, positional, flags))
    return commands


COMMANDS = _options()


def test_the_option_list_comes_from_the_parser():
    names = {name for name, _, _ in COMMANDS}
    assert names == {"train", "demo", "sweep", "resume", "predict", "evaluate", "inspect", "export"}
    train = dict((flag, takes) for flag, takes, _ in next(f for n, _, f in COMMANDS if n == "train"))
    assert train["--hidden"] and train["--domain"] and not train["--no-plots"] and len(train) > 35


PAIRS = [(name, positional, flags, flag) for name, positional, flags in COMMANDS for flag in flags]


def _value(choices):
    return st.one_of(st.sampled_from(ODD), st.sampled_from(ODD + list(choices)), st.text(max_size=8))


@st.composite
def command_lines(draw):
    """A subcommand with one of its options (every pair equally likely) and maybe a second one."""
    name, positional, flags, first = draw(st.sampled_from(PAIRS))
    argv = [name]
    if positional:
        argv.append(draw(st.sampled_from(["RUN", "RUN", "RUN", "--", "", "missing", "é"])))
    if name in ("train", "demo", "sweep"):
        argv += TINY + ["--out", "out"]
    if name == "predict":
        argv += ["--input", "x=0.5"]
    for flag, takes, choices in [first] + draw(st.lists(st.sampled_from(flags), max_size=1)):
        if not takes:
            argv.append(flag)
            continue
        value = draw(_value(choices))
        argv += [f"{flag}={value}"] if draw(st.booleans()) else [flag, value]
    return argv


def test_every_option_with_odd_values_exits_0_or_2(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    count = iter(range(10**6))

    @settings(max_examples=60, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(command_lines())
    def run(argv):
        work = tmp_path / f"w{next(count)}"
        shutil.copytree(run_dir, work / "RUN")  # a fresh run folder each time: a command may write into it
        monkeypatch.chdir(work)
        code = main(argv)
        _, err = capsys.readouterr()
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert lines[-1].startswith("nnfit: error: ") and len(lines) == 1 + sum(
                line.startswith("nnfit: warning: ") for line in lines), (argv, err)

    run()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out
