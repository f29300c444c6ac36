"""report.html: one self-contained page, checked as text and in a real headless browser."""

import base64
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import nnfit
from nnfit.cli import main

HEADINGS = ["Metrics", "Loss curve", "Fit", "Residuals", "Parameters", "Timing and memory", "Config"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium here (CI installs one with "
                                   "scripts/ci-system-deps.sh)")

# Injected into a copy of the page: records errors from the start, then writes what it saw into the DOM,
# where --dump-dom returns it. The report itself has no scripts.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => __errors.push("error: " + (e.message || (e.target && e.target.src) || e.type)), true);
document.addEventListener("securitypolicyviolation", e => __errors.push("csp: " + e.blockedURI));
for (const level of ["error", "warn"]) {
  console[level] = (...args) => __errors.push(level + ": " + args.join(" "));
}
window.addEventListener("load", () => {
  const text = sel => [...document.querySelectorAll(sel)].map(n => n.textContent.trim());
  const result = {
    h1: text("h1"), h2: text("h2"),
    metrics: [...document.querySelectorAll("#metrics-table tbody tr")].map(r => [...r.cells].map(c => c.textContent)),
    frozen: [...document.querySelectorAll("#parameter-table tr.frozen td:first-child")].map(c => c.textContent),
    images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, complete: i.complete})),
    sections: [...document.querySelectorAll("section")]
      .map(s => ({id: s.id, height: s.getBoundingClientRect().height})),
    columns: [...document.querySelectorAll("#metrics-table thead th")].map(c => c.textContent),
    tables: [...document.querySelectorAll("table")].map(t => t.id),
    errors: __errors,
  };
  const pre = document.createElement("pre");
  pre.id = "nnfit-probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short formula run with its first layer frozen, saved with plots (so with report.html)."""
    out = tmp_path_factory.mktemp("report") / "run"
    model = nnfit.fit(formula="x**2 + x", domain={"x": (0, 1)}, samples=300, epochs=5, freeze="l1",
                      out=str(out), quiet=True)
    return model, out, (out / "report.html").read_text(encoding="utf-8")


def _table(tmp_path_factory, targets):
    """A two-input table with ``targets`` (names -> function of a and b), written as CSV."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, 400), rng.uniform(0, 1, 400)
    path = tmp_path_factory.mktemp("tables") / f"{'_'.join(targets)}.csv"
    pd.DataFrame({"a": a, "b": b, **{name: f(a, b) for name, f in targets.items()}}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    data = _table(tmp_path_factory, {"y": lambda a, b: a * b})
    out = data.parent / "run"
    return nnfit.fit(data=str(data), target="y", epochs=4, out=str(out), quiet=True), out


@pytest.fixture(scope="module")
def two_target_run(tmp_path_factory):
    # The second target's residuals are tiny: the histogram that used to print its ticks into one smear.
    data = _table(tmp_path_factory, {"y1": lambda a, b: a * b, "y2": lambda a, b: np.sin(3 * a) * 1e-4 + b})
    out = data.parent / "run"
    return nnfit.fit(data=str(data), target="y1,y2", epochs=4, out=str(out), quiet=True), out


@pytest.fixture(scope="module")
def fine_tuned_run(tmp_path_factory):
    """A base run on [0, 1], then fine-tuned on [0, 2] with its first layer frozen, through the CLI."""
    root = tmp_path_factory.mktemp("finetune")
    base = root / "base"
    nnfit.fit(formula="x**2 + x", domain={"x": (0, 1)}, samples=300, epochs=4, out=str(base), quiet=True,
              plots=False)
    out = root / "tuned"
    assert main(["train", "--formula", "x**2 + x", "--domain", "x=0:2", "--samples", "300", "--epochs", "3",
                 "--init-from", str(base), "--freeze", "l1", "--out", str(out), "--quiet"]) == 0
    return nnfit.load(str(out)), out, base


def open_in_browser(page, tmp_path, shot=None):
    """Load ``page`` (HTML text) from disk in headless Chromium: (the probe's findings, console lines).

    With ``shot`` (a path), the same load also writes a 1000x1400 screenshot there.
    """
    probed = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probed = probed.replace("<head>", "<head>\n" + PROBE, 1)
    path = tmp_path / "probed.html"
    path.write_text(probed, encoding="utf-8")
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", path.as_uri()]
    if shot is not None:
        cmd[1:1] = ["--hide-scrollbars", "--window-size=1000,1400", f"--screenshot={shot}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="nnfit-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page did not finish loading:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(html.unescape(found.group(1))), console


def test_report_is_self_contained(run):
    _, out, page = run
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)  # nothing to fetch: only data URLs and anchors
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == page.count("<img") == 3  # loss, fit, residuals
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert base64.b64decode(images[0]) == (out / "loss.png").read_bytes()


def test_report_shows_the_run(run):
    model, _, page = run
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    test_mse = f"{model.summary['test']['mse']:.4e}"
    assert re.search(r'<table id="metrics-table">.*?<td>MSE</td>.*?' + re.escape(test_mse), page, re.S)
    frozen = re.findall(r'<tr class="frozen"><td>([^<]+)</td>', page)
    assert frozen == ["l1.weight", "l1.bias"]
    assert '<tr><td>l2.weight</td>' in page
    note = re.search(r'<p class="note" id="frozen-note">(.*?)</p>', page, re.S).group(1)
    frozen_count = model.module.l1.weight.numel() + model.module.l1.bias.numel()
    assert f"frozen: {frozen_count:,} parameters in 2 tensors (l1.weight, l1.bias), unchanged by training" in note
    assert "2 tensors frozen" in note and not re.search(r"frozen: [\d,]+ <span", note)
    assert model.summary["peak_memory"]["human"] in page
    assert "<td>x**2 + x</td>" in page  # the config


def test_no_report_without_plots(tmp_path):
    nnfit.fit(samples=50, epochs=1, out=str(tmp_path / "r"), quiet=True, plots=False)
    assert not (tmp_path / "r" / "report.html").exists()


@needs_browser
@pytest.mark.parametrize("which", ["formula", "table", "two targets", "fine-tuned"])
def test_every_kind_of_run_renders_in_headless_chromium(which, run, table_run, two_target_run, fine_tuned_run,
                                                        tmp_path):
    """Each kind of run: every section laid out, every image decoded, no error, and a picture that is not blank."""
    model, out = {"formula": run[:2], "table": table_run, "two targets": two_target_run,
                  "fine-tuned": fine_tuned_run[:2]}[which]
    shot = tmp_path / "page.png"
    seen, console = open_in_browser((out / "report.html").read_text(encoding="utf-8"), tmp_path, shot)
    assert seen["h2"] == HEADINGS
    assert [s["id"] for s in seen["sections"]] == ["metrics", "loss", "fit", "residuals", "parameters", "timing",
                                                   "config"]
    assert all(s["height"] > 40 for s in seen["sections"]), seen["sections"]
    assert len(seen["images"]) == 3  # loss, fit, residuals
    assert all(img["complete"] and img["width"] > 0 for img in seen["images"]), seen["images"]
    assert seen["errors"] == [] and console == []
    expected = {"formula": ["metric", "validation", "test"], "table": ["metric", "validation"],
                "two targets": ["metric", "validation"], "fine-tuned": ["metric", "validation", "test before", "test"]}
    assert seen["columns"] == expected[which]
    assert [row[0] for row in seen["metrics"]] == ["MSE", "RMSE", "MAE", "R²", "max abs error"]
    if which == "formula":
        assert seen["h1"] == ["nnfit run: formula 'x**2 + x'"]
        assert seen["frozen"] == ["l1.weight", "l1.bias"]
    if which == "two targets":
        assert "validation-per-target-table" in seen["tables"]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 900
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, tables and plots, not one blank colour
    top = pixels[: pixels.shape[0] // 3, :, :3]
    assert top.std() > 0.05  # the heading and the metrics table are drawn at the top


@needs_browser
def test_browser_check_catches_broken_pages(tmp_path):
    """The harness itself: a broken image, a console error and a blocked fetch are all noticed."""
    page = ('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            'img-src data:"></head><body><h1>x</h1><img alt="bad" src="data:image/png;base64,AAAA">'
            '<img alt="remote" src="https://example.com/a.png"><script>console.error("boom")</script></body></html>')
    seen, console = open_in_browser(page, tmp_path)
    assert [img["width"] for img in seen["images"]] == [0, 0]
    assert any("boom" in e for e in seen["errors"])
    assert any(e.startswith("csp:") for e in seen["errors"])
    assert console


def test_fine_tuned_report_has_the_test_before_column_and_its_origin(fine_tuned_run):
    model, out, base = fine_tuned_run
    page = (out / "report.html").read_text(encoding="utf-8")
    head = re.search(r'<table id="metrics-table"><thead><tr>(.*?)</tr>', page.replace("\n", ""), re.S).group(1)
    assert re.findall(r">([^<]+)</th>", head) == ["metric", "validation", "test before", "test"]
    before = f"{model.summary['init_from']['test_before']['mse']:.4e}"
    assert before in page
    assert f"started from <code>{html.escape(str(base))}</code> (scaling kept from the run)" in page
    assert "frozen: " in page and "l1.weight, l1.bias" in page


def test_two_targets_have_metrics_per_target(two_target_run):
    model, out = two_target_run
    per = model.summary["per_target"]["validation"]
    assert list(per) == ["y1", "y2"]
    # Each target's R² on its own; their mean is the combined row's R².
    assert np.isclose((per["y1"]["r2"] + per["y2"]["r2"]) / 2, model.summary["validation"]["r2"])
    assert per["y1"]["mse"] != per["y2"]["mse"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["per_target"] == model.summary["per_target"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<table id="validation-per-target-table">' in page and "<th class=\"num\">y2</th>" in page
    from nnfit.report import metrics_table

    text = metrics_table({"validation": model.summary["validation"]}, model.summary["per_target"])
    assert "validation, per target:" in text
    header = text.split("validation, per target:")[1].splitlines()[1]
    assert header.split() == ["metric", "y1", "y2"]


def test_fit_png_has_a_panel_per_target(two_target_run, table_run):
    from nnfit.report import fit_figure

    for (model, _), targets in ((two_target_run, ["y1", "y2"]), (table_run, ["y"])):
        fig = fit_figure(model, _problem(model))
        panels = [ax.get_label() for ax in fig.axes if ax.get_label().startswith("target ")]
        assert panels == [f"target {t}" for t in targets]
        titles = [ax.get_title() for ax in fig.axes]
        assert all(any(t.startswith(f"{name}: ") for t in titles) for name in targets)


def _problem(model):
    from nnfit.data import build_problem

    return build_problem(model.config)


def test_one_input_fit_png_has_a_panel_per_target(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, 300)
    path = tmp_path_factory.mktemp("one") / "one.csv"
    pd.DataFrame({"x": x, "u": x ** 2, "v": np.cos(3 * x)}).to_csv(path, index=False)
    model = nnfit.fit(data=str(path), target="u,v", epochs=2, quiet=True)
    from nnfit.report import fit_figure

    fig = fit_figure(model, _problem(model))
    assert [ax.get_label() for ax in fig.axes if ax.get_label().startswith("target ")] == ["target u", "target v"]


def _overlaps(fig, axis) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
    boxes.sort(key=lambda b: b.x0)
    return [(a, b) for a, b in zip(boxes, boxes[1:]) if a.x1 > b.x0]


def test_histogram_tick_labels_never_overlap(two_target_run):
    from nnfit.report import fit_figure

    model, _ = two_target_run
    fig = fit_figure(model, _problem(model))
    histograms = [ax for ax in fig.axes if ax.get_ylabel() == "count"]
    assert len(histograms) == 2
    for ax in histograms:
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) >= 3 and all("×" not in t and "$" not in t for t in labels), labels
        assert _overlaps(fig, ax.xaxis) == []


def test_loss_png_has_whole_epochs_and_plain_labels():
    from nnfit.report import loss_figure

    flat = [{"epoch": e, "train_loss": 0.0185 - e * 1e-4, "val_loss": 0.0190 - e * 1e-4} for e in range(1, 6)]
    steep = [{"epoch": e, "train_loss": 10.0 ** -e, "val_loss": 2 * 10.0 ** -e} for e in range(1, 6)]
    for history in (flat, steep):
        fig = loss_figure(history, "x**2 + x", {"train": 270, "validation": 30})
        ax = fig.axes[0]
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
        assert ticks and all(float(t).is_integer() for t in ticks)
        xlabels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert all(re.fullmatch(r"\d+", t) for t in xlabels), xlabels
        ylabels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
        assert len(ylabels) >= 2, ylabels
        assert all(re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", t) for t in ylabels), ylabels
        assert ax.get_title() == "x**2 + x: loss per epoch (270 training, 30 validation samples)"
    assert loss_figure(steep).axes[0].get_yscale() == "log"


def test_plot_titles_say_what_and_on_which_data(run, tmp_path_factory):
    from nnfit.report import fit_figure

    model, _, _ = run
    fig = fit_figure(model, _problem(model))
    assert fig.axes[0].get_title() == "x**2 + x: model vs truth over x in [0, 1]"
    two_inputs = nnfit.fit(formula="a*b", domain={"a": (0, 1), "b": (0, 1)}, samples=200, epochs=2, quiet=True)
    fig = fit_figure(two_inputs)
    assert fig.axes[0].get_title() == f"y: predicted vs true on {two_inputs.config.test_samples:,} fresh test points"


def test_the_prediction_line_takes_an_ensemble_band():
    import matplotlib.pyplot as plt
    import torch

    from nnfit.report import draw_prediction

    fig, ax = plt.subplots()
    x = torch.linspace(0, 1, 50)
    draw_prediction(ax, x, x ** 2)
    assert len(ax.lines) == 1 and not ax.collections
    draw_prediction(ax, x, x ** 2, std=torch.full((50,), 0.1), label="ensemble mean")
    band = ax.collections[0].get_paths()[0].vertices
    assert np.isclose(band[:, 1].max(), 1.2, atol=1e-6) and np.isclose(band[:, 1].min(), -0.2, atol=1e-6)
    plt.close(fig)
