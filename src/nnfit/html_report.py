"""report.html: one self-contained page per run, images embedded, readable from disk with no network.

The page has no scripts and a Content-Security-Policy that forbids every fetch, so opening it can
never reach the network: its images are base64 PNG data URLs, its style is inline.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import platform
from datetime import datetime
from pathlib import Path

from nnfit.checkpoint import atomic_write_bytes
from nnfit.devices import describe_peak
from nnfit.metrics import KEYS
from nnfit.report import LABELS, _figure_bytes, _points, readable_ticks

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1000px;
       padding: 0 1em; color: #1d2330; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d8dce4; padding-bottom: .2em; }
.lead { color: #5a6275; margin-top: 0; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .6em 0; font-variant-numeric: tabular-nums; }
th, td { padding: .25em .8em; border-bottom: 1px solid #e6e8ee; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }
tr.frozen td { background: #e8f1fb; }
tr.changed td:first-child::after { content: " *"; color: #b4561b; }
.badge { font-size: .8em; padding: .05em .45em; border-radius: .6em; background: #2f6db5; color: #fff; }
.note { color: #5a6275; font-size: .92em; }
img { max-width: 100%; height: auto; border: 1px solid #e6e8ee; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .92em; }
"""
SECTIONS = (("metrics", "Metrics"), ("loss", "Loss curve"), ("fit", "Fit"), ("residuals", "Residuals"),
            ("parameters", "Parameters"), ("timing", "Timing and memory"), ("config", "Config"))


def write_report(out, fitted, problem=None) -> Path:
    """Write ``out/report.html`` for a fitted model; ``loss.png`` and ``fit.png`` in ``out`` are embedded.

    Returns the path of the page.
    """
    out = Path(out)
    path = out / "report.html"
    atomic_write_bytes(path, render(fitted, out, problem).encode())
    return path


def render(fitted, out: Path, problem=None) -> str:
    s = fitted.summary or {}
    title = f"nnfit run: {s.get('source') or ', '.join(fitted.target_names)}"
    sections = {
        "metrics": _metrics(s),
        "loss": _image(out / "loss.png", "loss per epoch, train and validation",
                       "no loss curve: this model carries no training history"),
        "fit": _image(out / "fit.png", "the learned function against the true one or the data",
                      "no fit plot: a table run saved without its data has nothing to compare with"),
        "residuals": _residuals(fitted, problem),
        "parameters": _parameters(fitted),
        "timing": _timing(s),
        "config": _config(fitted.config),
    }
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=\"lead\">{_e(_lead(fitted, out))}</p>",
            "<nav>" + "".join(f"<a href=\"#{key}\">{_e(name)}</a>" for key, name in SECTIONS) + "</nav>"]
    for key, name in SECTIONS:
        body.append(f"<section id=\"{key}\"><h2>{_e(name)}</h2>\n{sections[key]}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _lead(fitted, out: Path) -> str:
    inputs, targets = ", ".join(fitted.input_names), ", ".join(fitted.target_names)
    return (f"run folder {fitted.path or out} · inputs {inputs} → targets {targets} · "
            f"written {datetime.now().strftime('%Y-%m-%d %H:%M')} by nnfit {fitted.summary.get('nnfit_version', '')}")


def _table(head, rows, numeric=(), row_classes=None, table_id=None) -> str:
    def cell(tag, i, value):
        return f'<{tag} class="num">{_e(value)}</{tag}>' if i in numeric else f"<{tag}>{_e(value)}</{tag}>"

    ident = f' id="{table_id}"' if table_id else ""
    lines = [f"<table{ident}>", "<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr></thead>",
             "<tbody>"]
    for r, row in enumerate(rows):
        cls = (row_classes or {}).get(r)
        attr = f' class="{cls}"' if cls else ""
        lines.append(f"<tr{attr}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return "\n".join(lines + ["</tbody>", "</table>"])


def _metrics(s: dict) -> str:
    """The CLI's table: validation, 'test before' for a fine-tuned run, test; per target when there are several."""
    before = s.get("init_from") or {}
    columns = {name: m for name, m in (("validation", s.get("validation")), ("test before", before.get("test_before")),
                                       ("test", s.get("test"))) if m}
    if not columns:
        return "<p class=\"note\">no metrics: this model carries no evaluation.</p>"
    parts = [_metric_table(columns, "metrics-table")]
    if "test" in columns:
        parts.append(f"<p class=\"note\">test: {s.get('test_samples', '')} fresh points from the domain, compared "
                     "with the true formula. Validation: the held-out rows. Original units.</p>")
    else:
        parts.append("<p class=\"note\">validation: the held-out rows, in original units.</p>")
    if before:
        parts.append(f"<p class=\"note\" id=\"started-from\">started from <code>{_e(before.get('run'))}</code> "
                     f"(scaling {_e(before.get('scaling'))}); 'test before' is that model on the same test points."
                     "</p>")
    for name, targets in (s.get("per_target") or {}).items():
        parts.append(f"<h3>{_e(name)}, per target</h3>" + _metric_table(targets, f"{name}-per-target-table"))
    return "".join(parts)


def _metric_table(columns: dict[str, dict], table_id: str) -> str:
    rows = [[LABELS[k], *(f"{m[k]:.4e}" for m in columns.values())] for k in KEYS]
    return _table(["metric", *columns], rows, numeric=range(1, len(columns) + 1), table_id=table_id)


def _image(path: Path, alt: str, missing: str) -> str:
    if not path.exists():
        return f"<p class=\"note\">{_e(missing)}</p>"
    return _img(path.read_bytes(), alt)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">"


def _residuals(fitted, problem) -> str:
    """Residual against prediction and their histogram: on the run's samples, or fresh formula points."""
    points = _points(fitted, problem)
    if points is None:
        return "<p class=\"note\">no residuals: a table run saved without its data has nothing to compare with.</p>"
    X, Y, what = points
    import matplotlib.pyplot as plt

    pred = fitted.predict_tensor(X)
    resid = (pred - Y).numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, name in enumerate(fitted.target_names):
        ax1.scatter(pred[:, j].numpy(), resid[:, j], s=5, alpha=0.4, label=name)
        ax2.hist(resid[:, j], bins=50, alpha=0.6, label=name)
    ax1.axhline(0, color="black", lw=0.6)
    ax1.set_xlabel("predicted")
    ax1.set_ylabel("residual (predicted − true)")
    ax1.set_title(f"residual against prediction on {what}", fontsize=10)
    ax2.set_xlabel("residual (predicted − true)")
    ax2.set_ylabel("count")
    ax2.set_title("their distribution", fontsize=10)
    for ax in (ax1, ax2):
        readable_ticks(ax.xaxis)
        readable_ticks(ax.yaxis)
        if len(fitted.target_names) > 1:
            ax.legend()
    against = " against the true formula" if fitted.formula is not None else ""
    return _img(_figure_bytes(fig), "residuals") + f"<p class=\"note\">{_e(what)}{against}; original units.</p>"


def _parameters(fitted) -> str:
    from nnfit.freeze import inspect

    inspection = inspect(fitted)
    rows, classes = [], {}
    for i, r in enumerate(inspection.rows):
        state = "trainable" if r["trainable"] else "frozen"
        if r["trainable"] and r.get("unfrozen_at"):
            state = f"trainable (from epoch {r['unfrozen_at']})"
        rows.append([r["name"], "×".join(map(str, r["shape"])), f"{r['numel']:,}", state,
                     _num(r.get("grad_norm")), _num(r.get("moved"))])
        if not r["trainable"]:
            classes[i] = "frozen"
    table = _table(["parameter", "shape", "elements", "state", "grad norm (last step)", "moved from start"],
                   rows, numeric=(2, 4, 5), row_classes=classes, table_id="parameter-table")
    frozen = [r["name"] for r in inspection.rows if not r["trainable"]]
    if frozen:
        tensors = f"{len(frozen)} tensor{'s' if len(frozen) != 1 else ''}"
        note = (f"<span class=\"badge\">{tensors} frozen</span> trainable: {inspection.trainable:,} parameters; "
                f"frozen: {inspection.frozen:,} parameters in {tensors} ({_e(', '.join(frozen))}), unchanged by "
                "training. Frozen rows are shaded; ")
    else:
        note = f"trainable: {inspection.trainable:,} parameters, none frozen; "
    return (table + f"<p class=\"note\" id=\"frozen-note\">{note}"
            "'moved' is the L2 norm of the change from the starting value.</p>"
            + "".join(f"<p class=\"note\">{_e(n)}</p>" for n in inspection.notes))


def _num(value) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.4e}")


def _timing(s: dict) -> str:
    if not s:
        return "<p class=\"note\">no timing: this model carries no training summary.</p>"
    rows = []

    def add(label, value):
        if value not in (None, "", [], {}):
            rows.append([label, value])

    epochs, seconds = s.get("epochs"), s.get("train_seconds")
    add("epochs", epochs and f"{epochs} (best: {s.get('best_epoch')})")
    add("stopped", s.get("stopped"))
    add("training time", seconds is not None and f"{seconds:.3f} s")
    if epochs and seconds:
        add("time per epoch", f"{seconds / epochs * 1000:.2f} ms")
        rows_seen = (s.get("samples") or {}).get("train", 0) * epochs
        if rows_seen:
            add("examples per second", f"{rows_seen / seconds:,.0f} (training rows × epochs ÷ training time)")
    add("total time", s.get("total_seconds") is not None and f"{s['total_seconds']:.3f} s (data, training, evaluation)")
    memory = s.get("peak_memory") or {}
    add("peak memory", memory and describe_peak(memory))
    add("device", s.get("device"))
    if s.get("world_size", 1) > 1:
        add("workers", s["world_size"])
    add("precision", s.get("precision"))
    add("recipe", s.get("recipe"))
    add("batch size at the end", s.get("final_batch_size"))
    add("out-of-memory retries", len(s.get("oom_retries") or []) or None)
    samples = s.get("samples") or {}
    add("samples", samples and f"{samples.get('train')} training, {samples.get('validation')} validation")
    add("parameters", s.get("parameters") and f"{s['parameters']:,}")
    env = s.get("environment") or {}
    add("environment", env and ", ".join(f"{k} {v}" for k, v in env.items()) + f", {platform.system()}")
    return _table(["", "value"], rows, table_id="timing-table")


def _config(config) -> str:
    rows, classes = [], {}
    for i, f in enumerate(dataclasses.fields(config)):
        value = getattr(config, f.name)
        rows.append([f.name, _show(f.name, value), f.metadata.get("help", "")])
        if value != f.default:
            classes[i] = "changed"
    return (_table(["setting", "value", "meaning"], rows, row_classes=classes, table_id="config-table")
            + "<p class=\"note\">* differs from the default. <code>config.json</code> in the run folder holds "
            "the same settings.</p>")


def _show(name: str, value) -> str:
    if value is None or value == ():
        return "-"
    if name == "domain":
        return ", ".join(f"{v}={low:g}:{high:g}" for v, low, high in value)
    if name == "lr_for":
        return ", ".join(f"{pattern}={lr:g}" for pattern, lr in value)
    if isinstance(value, tuple):
        return ", ".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)
