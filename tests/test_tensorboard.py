"""--tensorboard: per-epoch scalars in RUN/tb/<run>, read back from the event files."""

import csv
import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nnfit
from nnfit import devices, trainstate
from nnfit.cli import build_parser, config_from_args
from nnfit.errors import NnfitError

TAGS = {"loss/train", "loss/val", "lr", "grad_norm", "examples_per_second"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    model = nnfit.fit(formula="x**2 + x", domain={"x": (0, 1)}, samples=400, optimizer="adam", batch_size=64,
                      epochs=4, tensorboard=True, out=str(out), quiet=True, plots=False)
    return model, out, events_of(out)


def events_of(out):
    """The run's one events folder, RUN/tb/<run>, as summary.json names it, read back."""
    (folder,) = (out / "tb").iterdir()
    assert json.loads((out / "summary.json").read_text())["tensorboard"] == f"tb/{folder.name}"
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


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


SMALL = dict(formula="x**2 + x", domain={"x": (0, 1)}, samples=200, optimizer="adam", batch_size=50, epochs=3,
             tensorboard=True, quiet=True, plots=False)


def test_overwrite_replaces_the_previous_runs_events(tmp_path):
    out = tmp_path / "run"
    nnfit.fit(lr=1e-3, out=str(out), **SMALL)
    (first,) = (out / "tb").iterdir()
    (out / "tb" / "events.out.tfevents.0.old-layout").write_bytes(b"")  # a flat file, as older nnfit wrote
    nnfit.fit(lr=3e-2, out=str(out), overwrite=True, **{**SMALL, "epochs": 2}, seed=1)
    events = events_of(out)  # exactly one folder is left: this run's
    with open(out / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert scalars(events, "loss/train") == [(1, pytest.approx(losses[0], rel=1e-6)),
                                             (2, pytest.approx(losses[1], rel=1e-6))]
    assert not (out / "tb" / "events.out.tfevents.0.old-layout").exists()
    assert not first.exists()  # a run in the same second gets a folder of its own (its name -2)


def test_a_failed_overwrite_keeps_the_previous_runs_events(tmp_path, monkeypatch):
    out = tmp_path / "run"
    nnfit.fit(out=str(out), **SMALL)
    (before,) = (out / "tb").iterdir()
    kept = sorted(p.name for p in before.iterdir())

    class Killed(BaseException):
        pass

    def kill():
        raise Killed

    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:5")
    monkeypatch.setattr(devices, "kill_self", kill)
    with pytest.raises(Killed):
        nnfit.fit(out=str(out), overwrite=True, **SMALL)
    assert sorted(p.name for p in before.iterdir()) == kept  # the saved run's events are untouched
    assert json.loads((out / "summary.json").read_text())["tensorboard"] == f"tb/{before.name}"


def test_resume_continues_the_runs_events_and_logs_each_epoch_once(tmp_path, monkeypatch):
    out = tmp_path / "run"

    class Killed(BaseException):
        pass

    def kill():
        raise Killed

    # 4 steps an epoch; the state is saved at the end of epoch 1 only, the events of epochs 1 and 2 are
    # written: the resumed run trains epoch 2 again, and its events must replace the first ones.
    monkeypatch.setattr(trainstate, "DEFAULT_MIN_SECONDS", 3600.0)
    monkeypatch.setenv("NNFIT_FAULT", "kill-at-step:10")
    monkeypatch.setattr(devices, "kill_self", kill)
    with pytest.raises(Killed):
        nnfit.fit(out=str(out), **{**SMALL, "epochs": 4})
    (folder,) = (out / "tb").iterdir()
    before = EventAccumulator(str(folder))
    before.Reload()
    assert [step for step, _ in scalars(before, "loss/train")] == [1, 2]
    assert json.loads((out / "state.json").read_text())["position"]["epoch"] == 1
    monkeypatch.delenv("NNFIT_FAULT")
    nnfit.resume(str(out), quiet=True)
    assert [p.name for p in (out / "tb").iterdir()] == [folder.name]
    events = events_of(out)
    with open(out / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert [step for step, _ in scalars(events, "loss/train")] == [1, 2, 3, 4]
    assert [value for _, value in scalars(events, "loss/train")] == pytest.approx(losses, rel=1e-6)


def test_a_diverged_run_keeps_its_events(tmp_path, monkeypatch):
    from test_faults import poison_steps

    poison_steps(monkeypatch, lambda n: n >= 9)  # from epoch 3 on (4 steps an epoch): every retry diverges
    out = tmp_path / "run"
    with pytest.raises(NnfitError, match="training diverged"):
        nnfit.fit(out=str(out), **{**SMALL, "epochs": 6})
    events = events_of(out)  # the saved best weights come with the run's own events
    assert [step for step, _ in scalars(events, "loss/train")][:2] == [1, 2]


def test_a_run_saved_elsewhere_names_no_events_it_does_not_have(tmp_path):
    model = nnfit.fit(out=str(tmp_path / "run"), **SMALL)
    model.save(tmp_path / "copy")
    assert not (tmp_path / "copy" / "tb").exists()
    assert "tensorboard" not in json.loads((tmp_path / "copy" / "summary.json").read_text())
    assert nnfit.load(tmp_path / "copy").summary["epochs"] == 3


def test_a_sweep_refuses_tensorboard(tmp_path):
    with pytest.raises(NnfitError, match="--tensorboard was given to a sweep, which writes no TensorBoard events"):
        nnfit.sweep(formula="x**2 + x", domain={"x": (0, 1)}, samples=100, hidden=[(8,), (16,)], tensorboard=True,
                    out=str(tmp_path / "s"), quiet=True)
