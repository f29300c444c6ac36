"""The live progress bar: an ETA for fits longer than a few seconds, from epoch times only."""

import io
from types import SimpleNamespace

from nnfit import progress
from nnfit.progress import Reporter, eta_text


def test_eta_text():
    assert eta_text(1.0, 1, 2) == ""            # 2 s in all: too short to need one
    assert eta_text(2.0, 1, 10) == "eta 0:18 at most"
    assert eta_text(30.0, 1, 10) == "eta 4:30 at most"
    assert eta_text(3600.0, 1, 3) == "eta 2:00:00 at most"
    assert eta_text(5.0, 10, 10) == ""          # finished
    assert eta_text(5.0, 3, 10) == "eta 0:12 at most"  # 11.7 s, rounded up


def test_live_bar_shows_the_eta_after_an_epoch(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    reporter = Reporter(stream=io.StringIO(), live=True)
    recipe = SimpleNamespace(epochs=5, optimizer="adam", batch_size=10, describe=lambda: "adam")
    reporter.start(recipe, 100, 10)
    now[0] += 4.0  # the first epoch took 4 s: 4 more to go
    reporter.epoch({"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3, "seconds": 4.0}, True)
    fields = reporter._bar.tasks[0].fields
    assert fields["eta"] == "eta 0:16 at most" and fields["epoch"] == 2
    reporter._bar.stop()
