"""The command line: parse -> Config -> API call -> exit code. Importing this module must not import torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from datetime import datetime
from pathlib import Path

from nnfit.config import FIELDS, Config, parse_cli_value
from nnfit.errors import NnfitError, NnfitWarning, TrainingInterrupted

GROUPS = {"data": "what to learn", "model": "the network", "freeze": "freezing and fine-tuning",
          "training": "training", "device": "device", "output": "output"}
REPEATABLE = {"domain": "NAME=LOW:HIGH", "patterns": "PATTERN", "unfreeze": "EPOCH:PATTERN", "lr_for": "PATTERN=LR"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user mistake
        raise NnfitError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # Python 3.11's argparse reads "--opt=--" as an empty list (and skips the option's type):
        # the user gave the text "--", which each option then judges like any other value.
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if value == [] and not isinstance(action, argparse._AppendAction):
                value = "--" if action.type is None else self._convert(action, "--")
            elif isinstance(value, list):
                value = ["--" if v == [] else v for v in value]
            else:
                continue
            setattr(namespace, action.dest, value)
        return namespace, extras

    def _convert(self, action, text):
        try:
            return action.type(text)
        except (TypeError, ValueError):
            self.error(f"argument {'/'.join(action.option_strings)}: invalid {action.type.__name__} value: {text!r}")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        group = groups[meta["group"]]
        default = "" if f.default is None or meta["kind"] == "bool" else f" (default: {_show(f.default)})"
        if meta["kind"] == "bool":
            action = "store_false" if flag.startswith("--no-") else "store_true"
            group.add_argument(flag, dest=f.name, action=action, default=argparse.SUPPRESS, help=meta["help"])
        elif meta["kind"] in REPEATABLE:
            group.add_argument(flag, dest=f.name, action="append", default=argparse.SUPPRESS,
                               metavar=REPEATABLE[meta["kind"]], help=meta["help"])
        else:
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else f.name.upper()
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                               help=meta["help"] + default)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nnfit", description="Teach a fully connected network a function from a formula "
                     "or a table, then evaluate, explain and predict with it.",
                     epilog="Run 'nnfit demo' for the tutorial's exercise, y = x**2 + x on [0, 1].")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    for name, help in (("train", "train a model on a formula or a table (default: the tutorial's exercise)"),
                       ("demo", "the tutorial's exercise: learn y = x**2 + x on [0, 1] from 1000 samples")):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        _add_config_options(p)

    p = sub.add_parser("resume", help="continue a stopped run from its training state",
                       description="Continue a run that was killed, interrupted (Ctrl-C, SIGTERM) or ran out of "
                       "disk space, from the training state in its folder. The samples are drawn or read again; "
                       "with a fixed seed on the CPU the result is bit-identical to an uninterrupted run.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--data", help="the run's table, if it moved or the run was started from another folder")
    p.add_argument("--quiet", action="store_true", default=None, help="print only errors and the result")
    p.add_argument("--verbose", action="store_true", default=None, help="print every epoch")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p = sub.add_parser("predict", help="predict with a trained model", description="Predict with a trained model.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--data", help="table of inputs (.csv, .tsv, .parquet, .npy, .npz)")
    p.add_argument("--input", action="append", metavar="NAME=VALUE[,VALUE...]",
                   help="input values on the command line (repeat per input)")
    p.add_argument("--out", help="write predictions to this file (.csv or .parquet) instead of printing them")
    p.add_argument("--device", default="cpu", help="device to predict on (default: cpu)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p = sub.add_parser("evaluate", help="metrics of a trained model on a table, or on fresh formula points",
                       description="Metrics of a trained model, in original units.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--data", help="table with the input and target columns (default for a formula run: "
                   "fresh points drawn from the domain)")
    p.add_argument("--target", help="target column(s) in --data (default: those the model was trained on)")
    p.add_argument("--samples", type=int, help="fresh points for a formula run (default: the run's test_samples)")
    p.add_argument("--seed", type=int, help="seed of the fresh points")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--device", default="cpu", help="device to evaluate on (default: cpu)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p = sub.add_parser("inspect", help="what trains and what is frozen: one row per parameter",
                       description="One row per parameter: shape, elements, trainable or frozen, the gradient "
                       "norm at the last step and how far it moved from its starting value; then the totals.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--json", action="store_true", help="print the rows and totals as JSON")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    p = sub.add_parser("export", help="write the model as ONNX or TorchScript, scaling included",
                       description="Write a deployable model: it takes inputs and returns outputs in original "
                       "units (the scaling is baked in), with any batch size.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                   help="onnx (needs pip install 'nnfit[export]') or torchscript")
    p.add_argument("--out", help="file to write (default: RUN/model.onnx or RUN/model.pt)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _version() -> str:
    from nnfit import __version__

    return f"nnfit {__version__}"


def config_from_args(args: argparse.Namespace) -> Config:
    """Every bad value and every invalid combination, reported together."""
    problems: list[str] = []
    values = {}
    for name in FIELDS:
        if hasattr(args, name):
            values[name] = parse_cli_value(name, getattr(args, name), problems)
    defaulted = not values.get("out")
    if defaulted:
        values["out"] = "runs/<timestamp>"  # created below, once the settings are valid
    try:
        config = Config.from_dict(values)
    except NnfitError as exc:
        problems += str(exc).removeprefix("invalid settings: ").split("; ")
        config = None
    if problems:
        raise NnfitError("invalid settings: " + "; ".join(problems))
    return config.replace(out=_default_out()) if defaulted else config


def _default_out() -> str:
    """runs/<timestamp>, created here: two runs started in the same second get two folders (-2, -3, ...)."""
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir(parents=True)
            return str(out)
        except FileExistsError:
            continue
        except OSError as exc:
            raise NnfitError(f"could not create the run folder {out}: {exc.strerror or exc}; pass --out DIR") from None
    raise NnfitError(f"{base}-2 ... {base}-999 all exist; pass --out DIR")


def cmd_train(args) -> int:
    import nnfit

    config = config_from_args(args)
    with _stop_on_signals(config.devices):
        model = nnfit.fit(config=config)
    return _report(model, config, args.command)


def cmd_resume(args) -> int:
    import nnfit
    from nnfit.runfolder import STATE, read_json

    try:
        workers = int(read_json(args.run, STATE)["config"]["devices"])
    except (NnfitError, LookupError, TypeError, ValueError):
        workers = 1  # nnfit.resume reports what is wrong with the run folder
    with _stop_on_signals(workers):
        model = nnfit.resume(args.run, data=args.data, quiet=args.quiet, verbose=args.verbose)
    return _report(model, model.config, args.command)


def _stop_on_signals(workers: int):
    """SIGINT and SIGTERM save the training state and stop (exit 130 or 143); a second one stops at once.
    Under DDP the ranks agree to stop at an epoch end. With ``--devices N`` this process only starts the
    workers, and ``launch.run_workers`` forwards the signal to them."""
    from contextlib import nullcontext

    from nnfit import devices, trainstate

    if workers > 1 and not devices.launched():
        return nullcontext()
    return trainstate.handling_signals(trainstate.ECHO_SECONDS if devices.launched() else 0.0)


def _report(model, config, command: str) -> int:
    from nnfit.devices import describe_peak
    from nnfit.report import metrics_table

    if model.path is None:  # a torchrun worker other than rank 0: rank 0 reports and writes the run folder
        return 0
    s = model.summary
    epochs = f"{s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}"
    print(f"\n{s['source']}: {epochs} in {s['train_seconds']:.2f} s; stopped: {s['stopped']}")
    before = s.get("init_from", {})
    print(metrics_table({"validation": s.get("validation"), "test before": before.get("test_before"),
                         "test": s.get("test")}, s.get("per_target")))
    if "test" in s:
        print(f"test: {s['test_samples']} fresh points from the domain, compared with the true formula")
    if before:
        print(f"started from {before['run']} (scaling {before['scaling']}); 'test before' is that model "
              "on the same test points")
    if "frozen" in s:
        print(f"frozen: {s['frozen']}")
    if s.get("oom_retries"):
        print(f"out of memory {len(s['oom_retries'])} time(s): the last forward passes took {s['final_batch_size']} "
              "rows at a time (the optimizer's batch was unchanged)")
    if s.get("rollbacks"):
        print(f"the loss became non-finite {len(s['rollbacks'])} time(s): each time the run rolled back to its last "
              f"good state and halved the learning rate (last: {s['rollbacks'][-1]['lr']:.3g})")
    if "peak_memory" in s:
        print(f"peak memory: {describe_peak(s['peak_memory'])}")
    from nnfit.runfolder import is_run_file

    written = sorted(p.name for p in Path(config.out).iterdir() if is_run_file(p.name) and not p.name.startswith("."))
    print(f"run folder: {config.out} ({', '.join(written)})")
    tutorial = config.formula == "x**2 + x" and config.domain == (("x", 0.0, 1.0),) and config.data is None
    if command in ("demo", "train") and tutorial and config.activation != "none" and not config.quiet \
            and not config.init_from:
        print("the tutorial's own network (no activations, SGD lr 0.01, 10 epochs) stays near test MSE 6e-3: "
              "without activations it is linear. Try: nnfit train --activation none")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    import nnfit

    model = nnfit.load(args.run, device=args.device)
    if bool(args.data) == bool(args.input):
        raise NnfitError("both --data and --input were given; give the inputs one way" if args.data else
                         f"no inputs given; pass --data FILE or --input NAME=VALUE (inputs: {', '.join(model.input_names)})")
    if args.data:
        from nnfit.tables import read_inputs

        frame = read_inputs(args.data, model.input_names, allowed_extra=model.target_names)
    else:
        frame = _parse_inputs(args.input, model.input_names)
    pred = np.asarray(model.predict(frame[list(model.input_names)])).reshape(len(frame), -1)
    out = frame.copy()
    for i, name in enumerate(model.target_names):
        out[f"{name}_pred"] = pred[:, i]
    if args.out:
        from nnfit.checkpoint import atomic_write_bytes
        from nnfit.runfolder import check_output

        check_output(args.out)
        if args.out.endswith((".parquet", ".pq")):
            atomic_write_bytes(args.out, out.to_parquet(index=False))
        else:
            atomic_write_bytes(args.out, out.to_csv(index=False).encode())
        print(f"wrote {len(out)} prediction(s) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(out.to_csv(index=False, float_format="%.9g"))
    return 0


def _parse_inputs(items, names):
    import pandas as pd

    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise NnfitError(f"--input {item!r} must look like NAME=VALUE, e.g. {names[0]}=0.5")
        if name not in names:
            raise NnfitError(f"--input {name!r} is not an input of this model; its inputs are {', '.join(names)}")
        try:
            values[name] = [float(v) for v in text.split(",")]
        except ValueError:
            raise NnfitError(f"--input {item!r}: {text!r} is not a number or comma-separated numbers") from None
    missing = [n for n in names if n not in values]
    if missing:
        raise NnfitError(f"missing --input for {', '.join(missing)}; the model takes {', '.join(names)}")
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise NnfitError("every --input must give the same number of values")
    return pd.DataFrame(values)


def cmd_evaluate(args) -> int:
    import nnfit
    from nnfit.report import metrics_table

    model = nnfit.load(args.run, device=args.device)
    metrics = model.evaluate(data=args.data, target=args.target, samples=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        label = "test" if args.data is None else Path(args.data).name
        print(metrics_table({label: metrics}))
    return 0


def cmd_inspect(args) -> int:
    from nnfit.freeze import inspect

    inspection = inspect(args.run)
    print(json.dumps(inspection.to_dict(), indent=2) if args.json else inspection.table())
    return 0


def cmd_export(args) -> int:
    import nnfit
    from nnfit.export import export

    model = nnfit.load(args.run)
    path = export(model, args.format, args.out)
    print(f"wrote {path}: input x of shape (batch, {len(model.input_names)}), columns "
          f"{', '.join(model.input_names)}; output y of shape (batch, {len(model.target_names)}), "
          f"{', '.join(model.target_names)}; original units")
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_train, "resume": cmd_resume, "predict": cmd_predict, "evaluate": cmd_evaluate,
            "inspect": cmd_inspect, "export": cmd_export}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, NnfitWarning):
        print(f"nnfit: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _silence_closed_pipes() -> None:
    """Point stdout and stderr at /dev/null, so that flushing them at exit cannot fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):  # pytest's captured streams have no file descriptor
            pass
    os.close(devnull)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    parser = build_parser()
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        from nnfit import trainstate

        # SIGINT and SIGTERM stop every command with one line and exit 130 or 143: at once, or when
        # the phase in progress (training, saving a run) has done its work (trainstate.phase).
        with trainstate.handling_signals():
            return COMMANDS[args.command](args)
    except NnfitError as exc:
        if debug:
            raise
        print("nnfit: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"nnfit: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nnfit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (nnfit inspect RUN | head -1): stop quietly, as Unix tools do
        _silence_closed_pipes()
        return 0
    finally:
        warnings.showwarning = previous
