"""--tensorboard: per-epoch scalars in RUN/tb, read back from the event file."""

import csv
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nnfit
from nnfit.cli import build_parser, config_from_args
from nnfit.errors import NnfitError

TAGS = {"loss/train", "loss/val", "lr", "grad_norm", "examples_per_second"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    model = nnfit.fit(formula="x**2 + x", domain={"x": (0, 1)}, samples=400, optimizer="adam", batch_size=64,
                      epochs=4, tensorboard=True, out=str(out), quiet=True, plots=False)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return model, out, events


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_every_scalar_is_logged_once_per_epoch(run):
    _, out, events = run
    assert TAGS <= set(events.Tags()["scalars"])
    for tag in TAGS:
        assert [step for step, _ in scalars(events, tag)] == [1, 2, 3, 4], tag


def test_logged_values_match_the_run_history(run):
    model, out, events = run
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for tag, column in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("lr", "lr")):
        logged = [value for _, value in scalars(events, tag)]
        assert logged == pytest.approx([float(r[column]) for r in rows], rel=1e-6), tag
    lrs = [value for _, value in scalars(events, "lr")]
    assert len(set(lrs)) == 4  # the one-cycle schedule moves the rate every epoch
    n_train = model.summary["samples"]["train"]
    speeds = [value for _, value in scalars(events, "examples_per_second")]
    assert speeds == pytest.approx([n_train / float(r["seconds"]) for r in rows], rel=1e-5)
    norms = [value for _, value in scalars(events, "grad_norm")]
    assert all(0 < g < 1e3 for g in norms)


def test_missing_tensorboard_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(NnfitError, match=r"tensorboard needs the tensorboard package.*nnfit\[tensorboard\]"):
        nnfit.fit(samples=50, epochs=1, tensorboard=True, out=str(tmp_path / "r"), quiet=True, plots=False)


def test_tensorboard_needs_a_run_folder():
    with pytest.raises(NnfitError, match="tensorboard writes to RUN/tb, but no run folder was given; pass out=RUN"):
        nnfit.fit(samples=50, epochs=1, tensorboard=True, quiet=True)


def test_cli_flag(tmp_path):
    args = build_parser().parse_args(["train", "--tensorboard", "--out", str(tmp_path)])
    assert config_from_args(args).tensorboard is True
