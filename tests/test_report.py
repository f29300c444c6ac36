"""report.html: one self-contained page, checked as text and in a real headless browser."""

import base64
import html
import json
import re
import shutil
import subprocess

import pytest

import nnfit

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


def open_in_browser(page, tmp_path):
    """Load ``page`` (HTML text) from disk in headless Chromium: (the probe's findings, console lines)."""
    probed = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probed = probed.replace("<head>", "<head>\n" + PROBE, 1)
    path = tmp_path / "probed.html"
    path.write_text(probed, encoding="utf-8")
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", path.as_uri()]
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
    assert '<tr><td>l2.weight</td>' in page and "2 frozen" in page
    assert model.summary["peak_memory"]["human"] in page
    assert "<td>x**2 + x</td>" in page  # the config


def test_no_report_without_plots(tmp_path):
    nnfit.fit(samples=50, epochs=1, out=str(tmp_path / "r"), quiet=True, plots=False)
    assert not (tmp_path / "r" / "report.html").exists()


@needs_browser
def test_report_renders_in_headless_chromium(run, tmp_path):
    _, _, page = run
    seen, console = open_in_browser(page, tmp_path)
    assert seen["h1"] == ["nnfit run: formula 'x**2 + x'"]
    assert seen["h2"] == HEADINGS
    assert [row[0] for row in seen["metrics"]] == ["MSE", "RMSE", "MAE", "R²", "max abs error"]
    assert all(len(row) == 3 for row in seen["metrics"])  # metric, validation, test
    assert seen["frozen"] == ["l1.weight", "l1.bias"]
    assert len(seen["images"]) == 3
    assert all(img["complete"] and img["width"] > 0 for img in seen["images"]), seen["images"]
    assert seen["errors"] == [] and console == []


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
