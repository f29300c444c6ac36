"""Messages that tell a stuck user what to do: each test checks the words, not only the exception type."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import nnfit
from nnfit import NnfitError, NnfitWarning
from nnfit.cli import main

TINY = {"samples": 200, "test_samples": 200, "epochs": 1, "quiet": True, "plots": False}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(1, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.l2(self.l1(x))  # no nonlinearity: the tutorial's bug


class SecondColumn(TwoLayers):
    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x[:, 1].unsqueeze(1))))  # the data has one column


class NeedsWidth(TwoLayers):
    def __init__(self, width):
        super().__init__()


class Tanh(TwoLayers):
    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_probe_failure_names_module_batch_and_columns():
    with pytest.raises(NnfitError) as err:
        nnfit.fit(model=SecondColumn(), **TINY)
    assert str(err.value).startswith("SecondColumn.forward failed on a probe batch of shape (2, 1), "
                                     "the data's 1 column (x): IndexError: ")


def test_module_class_that_needs_arguments():
    with pytest.raises(NnfitError, match=r"model=NeedsWidth could not be built without arguments \(.*'width'\); "
                                         r"pass an instance instead: model=NeedsWidth\(...\)"):
        nnfit.fit(model=NeedsWidth, **TINY)


def test_linear_custom_module_warns_like_activation_none():
    with pytest.warns(NnfitWarning, match="TwoLayers is linear: its output is an affine function of its input .* "
                                          "activation='none'"):
        nnfit.fit(model=TwoLayers(), **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NnfitWarning)  # a network with a nonlinearity: no warning
        nnfit.fit(model=Tanh(), **TINY)


def test_caret_is_explained_as_xor(capsys):
    code, _, err = run(capsys, "train", "--formula", "x^2 + x", "--domain", "x=0:1")
    assert code == 2
    assert "'^' is XOR in Python, not a power; write powers with '**': 'x**2 + x'" in err


@pytest.mark.parametrize("argv, hint", [
    (["train", "--formla", "x"], "unrecognized arguments: --formla x; did you mean --formula? (see nnfit train --help)"),
    (["train", "--hiden", "8"], "did you mean --hidden?"),
    (["predict", "run", "--inptu", "x=1"], "did you mean --input? (see nnfit predict --help)"),
    (["trian"], "did you mean train?"),
])
def test_mistyped_option_gets_the_closest_one(capsys, argv, hint):
    code, _, err = run(capsys, *argv)
    assert code == 2 and hint in err


def test_mistyped_setting_in_python_gets_the_closest_one():
    with pytest.raises(NnfitError) as err:
        nnfit.fit(epoch=5)
    assert str(err.value) == "unknown setting epoch; did you mean epochs?"
    assert "known settings" not in str(err.value)


def test_several_columns_in_one_input(tutorial_run, capsys):
    _, out = tutorial_run
    code, _, err = run(capsys, "predict", str(out), "--input", "x=0.1,y=0.2")
    assert code == 2
    assert "repeat --input per column: --input x=0.1 --input y=0.2" in err


def test_python_errors_speak_python_and_the_cli_speaks_options(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("a,b,y\n1,2,3\n2,3,5\n3,4,7\n")
    with pytest.raises(NnfitError, match=r"no target given: pass target=NAME; columns are: a, b, y"):
        nnfit.fit(data=str(table))
    code, _, err = run(capsys, "train", "--data", str(table))
    assert code == 2 and "pass --target NAME" in err
    with pytest.raises(NnfitError) as info:
        nnfit.fit(lr=-1, batch_size=0)
    assert "batch_size must be a positive integer" in str(info.value) and "--" not in str(info.value)


@pytest.mark.parametrize("domain", [{"x": (0, 1)}, "x=0:1", ["x=0:1"], {"x": "0:1"}])
def test_domain_forms_accepted(domain):
    assert nnfit.Config(formula="x", domain=domain).domain == (("x", 0.0, 1.0),)


@pytest.mark.parametrize("domain, phrase", [
    ({"x": (0,)}, "domain: the range of 'x' must be (low, high), such as domain={'x': (0, 1)}"),
    ("x0:1", "domain must give each variable a range (low, high)"),
    ({"x": (2, 1)}, "domain={'x': (2, 1)} has reversed bounds; did you mean domain={'x': (1, 2)}?"),
])
def test_bad_domain_in_python(domain, phrase):
    with pytest.raises(NnfitError) as err:
        nnfit.Config(formula="x", domain=domain)
    assert phrase in str(err.value)


def test_devices_without_main_guard_says_what_is_missing(tmp_path):
    script = tmp_path / "fit_script.py"
    script.write_text("import nnfit\nnnfit.fit(devices=2, device='cpu', samples=50, epochs=1, quiet=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "fit(devices=2) starts 2 worker processes" in proc.stderr
    assert "Put the code that calls fit under 'if __name__ == \"__main__\":'" in proc.stderr


def test_few_samples_warn(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--samples", "5", "--epochs", "1", "--no-plots", "--out", str(tmp_path / "r"))
    assert code == 0
    assert ("nnfit: warning: --samples 5 gives 4 training row(s) and 1 validation row(s): a validation score "
            "needs at least 5 points") in err


def test_singularity_in_the_domain_is_named():
    with pytest.warns(NnfitWarning) as record:
        nnfit.fit(formula="1/x", domain={"x": (-1, 1)}, samples=300, test_samples=2000, hidden=(32, 32),
                  epochs=8, quiet=True, plots=False)
    text = " ".join(str(w.message) for w in record)
    assert "the test metrics are far worse than validation" in text
    assert "singularity or a spike (such as 1/x near 0)" in text


def test_smooth_fit_has_no_test_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NnfitWarning)
        nnfit.fit(formula="x**2 + x", domain={"x": (0, 1)}, samples=300, test_samples=2000, epochs=5,
                  quiet=True, plots=False)


def test_no_plots_and_target_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-plots do not write fit.png, loss.png and report.html" in text
    assert "(default: )" not in text
    assert "--help-all" in text and "--momentum" not in text  # advanced options only in --help-all
    with pytest.raises(SystemExit):
        main(["train", "--help-all"])
    assert "--momentum" in capsys.readouterr().out


def test_subcommand_options_come_from_config_metadata():
    from nnfit.cli import build_parser
    from nnfit.config import FIELDS

    parser = build_parser()
    commands = next(a.choices for a in parser._actions if a.dest == "command")
    for name, field in FIELDS.items():
        for command, help in field.metadata["commands"].items():
            action = next(a for a in commands[command]._actions if a.dest == name)
            assert action.help == help


def test_export_is_an_attribute_after_import_nnfit():
    code = "import nnfit; print(callable(nnfit.export.export))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_verbose_api_shows_the_result_the_cli_prints(capsys, tmp_path):
    model = nnfit.fit(samples=64, test_samples=200, epochs=1, plots=False, verbose=True)
    err = capsys.readouterr().err
    from nnfit.progress import result_text

    assert result_text(model) in err and "test: 200 fresh points" in err
    code, out, _ = run(capsys, "demo", "--samples", "64", "--test-samples", "200", "--epochs", "1", "--no-plots",
                       "--out", str(tmp_path / "demo"))
    assert code == 0 and "test: 200 fresh points" in out
    assert out.rstrip().endswith("Try: nnfit train --activation none")  # the demo's closing hint


def test_no_validation_rows_by_choice_is_not_too_few_rows():
    """val_split=0 is a choice (benchmarks use it): a large table then gets no few-rows warning."""
    import warnings

    import numpy as np
    import pandas as pd

    x = np.linspace(0, 1, 2000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nnfit.fit(data=pd.DataFrame({"x": x, "y": x ** 2}), target="y", val_split=0.0, epochs=1, quiet=True,
                  optimizer="adam", plots=False)
    assert not [w for w in caught if "training row(s)" in str(w.message)]
