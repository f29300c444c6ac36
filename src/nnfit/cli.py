"""The command line: parse -> Config -> API call -> exit code. Importing this module must not import torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import warnings
from datetime import datetime
from pathlib import Path

from nnfit.config import FIELDS, Config, parse_cli_value
from nnfit.errors import NnfitError, NnfitWarning, TrainingInterrupted
from nnfit.progress import PipeSafe, Reporter, metrics_table

GROUPS = {"data": "what to learn", "model": "the network", "freeze": "freezing and fine-tuning",
          "training": "training", "device": "device", "output": "output"}
REPEATABLE = {"domain": "NAME=LOW:HIGH", "patterns": "PATTERN", "unfreeze": "EPOCH:PATTERN", "lr_for": "PATTERN=LR"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user mistake
        hint, prog = self._did_you_mean(message)
        raise NnfitError(f"{message}{hint} (see {prog} --help)")

    def _did_you_mean(self, message: str) -> tuple[str, str]:
        """The closest option (or command) to a mistyped one, --formla -> --formula; and the help to see."""
        import difflib

        commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
        parser = next((commands[a] for a in getattr(self, "_seen", []) if a in commands), self)
        if message.startswith("unrecognized arguments: "):
            wrong = [t.split("=")[0] for t in message.removeprefix("unrecognized arguments: ").split()
                     if t.startswith("--")]
            known = {o.lstrip("-"): o for o in parser._option_string_actions if o.startswith("--")}
        elif "invalid choice: " in message and commands and parser is self:
            wrong, known = [message.split("invalid choice: ")[1].split("'")[1]], {c: c for c in commands}
        else:
            return "", parser.prog
        close = [known[m[0]] for w in wrong if (m := difflib.get_close_matches(w.lstrip("-"), known, n=1, cutoff=0.7))]
        return (f"; did you mean {', '.join(close)}?" if close else ""), parser.prog

    def parse_known_args(self, args=None, namespace=None):
        self._seen = list(sys.argv[1:] if args is None else args)  # for the did-you-mean of error()
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


class _HelpAll(argparse.Action):
    """``nnfit train --help-all``: the help with every option, the advanced ones included."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        command = parser.prog.split()[-1]
        build_parser(show_all=True).parse_args([command, "--help"])


def _flag(name: str) -> str:
    return FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


# nnfit sweep: these options take lists; the configurations are every combination.
SWEEP_LISTS = {"lr": ("LR,LR...", "learning rates to try, comma-separated, such as 1e-3,3e-3,1e-2"),
               "hidden": ("W,W:W,W...", "networks to try: hidden widths comma-separated, networks separated by "
                          "':', such as 64,64:100,100"),
               "activation": ("ACT,ACT...", "activations to try, comma-separated, such as tanh,silu"),
               "time_budget": ("SECONDS", "seconds for the whole sweep: the default configuration's run (when "
                               "listed) may use all of it; the rungs of successive halving share what is left in "
                               "proportion to their epochs; the survivor's full run gets what is left")}


def _add_config_options(parser: argparse.ArgumentParser, show_all: bool, lists=None) -> None:
    """train, demo and sweep: every Config field, grouped; the advanced ones only in --help-all.
    ``lists``: fields that take a list of values to try (nnfit sweep), with their metavar and help."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    hidden = 0
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        if lists and f.name in lists:
            metavar, help = lists[f.name]
            groups[meta["group"]].add_argument(_flag(f.name), dest=f.name, metavar=metavar,
                                               default=argparse.SUPPRESS, help=help)
            continue
        shown = show_all or meta.get("level", "common") != "advanced"
        hidden += not shown
        help = meta["help"] + _default(f) if shown else argparse.SUPPRESS
        _add_field(groups[meta["group"]], f, help, argparse.SUPPRESS)
    parser.epilog = None if show_all else f"{hidden} more options for tuning, devices and output: {parser.prog} --help-all"
    parser.add_argument("--help-all", action=_HelpAll, help="show every option, with the advanced ones")


def _add_field(parser, f, help: str, default) -> None:
    """One Config field as an option, its parsing and choices read from the field's metadata."""
    meta, flag = f.metadata, _flag(f.name)
    if meta["kind"] == "bool":
        action = "store_false" if flag.startswith("--no-") else "store_true"
        parser.add_argument(flag, dest=f.name, action=action, default=default, help=help)
    elif meta["kind"] in REPEATABLE:
        parser.add_argument(flag, dest=f.name, action="append", default=default, metavar=REPEATABLE[meta["kind"]],
                            help=help)
    else:
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else f.name.upper()
        parser.add_argument(flag, dest=f.name, default=default, metavar=metavar, help=help)


def _default(f) -> str:
    if f.default in (None, ()) or f.metadata["kind"] == "bool":
        return ""
    return f" (default: {_show(f.default)})"


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


OVERWRITE = ("--overwrite", {"action": "store_true", "help": "replace the --out file if it exists (never the "
                                                           "--data file, never anything but a regular file)"})

# The other subcommands: help, description, and options of their own; their Config options are the
# fields whose metadata names the subcommand (config.py), with the help given there.
SUBCOMMANDS = {
    "resume": ("continue a stopped run from its training state",
               "Continue a run that was killed, interrupted (Ctrl-C, SIGTERM) or ran out of disk space, from the "
               "training state in its folder. The samples are drawn or read again; with a fixed seed on the CPU "
               "the result is bit-identical to an uninterrupted run.", ()),
    "predict": ("predict with a trained model", "Predict with a trained model.",
                (("--input", {"action": "append", "metavar": "NAME=VALUE[,VALUE...]",
                              "help": "input values on the command line: repeat --input per input column, "
                                      "e.g. --input a=0.1 --input b=0.2; several values per column, "
                                      "comma-separated, give several rows"}),
                 ("--std", {"action": "store_true",
                            "help": "require the spread: an ensemble (--ensemble K) always adds <target>_std, the "
                                    "members' standard deviation; with a single network this is an error"}),
                 OVERWRITE)),
    "evaluate": ("metrics of a trained model on a table, or on fresh formula points",
                 "Metrics of a trained model, in original units.",
                 (("--json", {"action": "store_true", "help": "print the metrics as JSON"}),)),
    "inspect": ("what trains and what is frozen: one row per parameter",
                "One row per parameter: shape, elements, trainable or frozen, the gradient norm at the last step "
                "and how far it moved from its starting value; then the totals.",
                (("--json", {"action": "store_true", "help": "print the rows and totals as JSON"}),)),
    "export": ("write the model as ONNX or TorchScript, scaling included",
               "Write a deployable model: it takes inputs and returns outputs in original units (the scaling is "
               "baked in), with any batch size.",
               (("--format", {"required": True, "choices": ("onnx", "torchscript"),
                              "help": "onnx (needs pip install 'nnfit[export]') or torchscript"}),
                OVERWRITE)),
}


def _command_fields(command: str) -> list:
    return [f for f in dataclasses.fields(Config) if command in f.metadata.get("commands", {})]


def build_parser(show_all: bool = False) -> argparse.ArgumentParser:
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
        _add_config_options(p, show_all)

    help = "train every combination of learning rates, networks and activations; keep the best"
    p = sub.add_parser("sweep", help=help, description=help + " by validation loss, as an ordinary run folder "
                       "with sweep.csv (one row per configuration) beside it. The samples are built once and "
                       "shared. By default successive halving: every configuration trains with 1/3, 1/9, ... of "
                       "the budget, the best third goes on, and the last one trains as an ordinary run; when the "
                       "lists include the configuration nnfit train would train, it trains first, in full, and "
                       "wins unless the survivor has a lower validation loss. Other options are those of nnfit "
                       "train, one value each.")
    p.add_argument("--width", metavar="W,W...", help="hidden widths to try, comma-separated, each at every --depth "
                   "(in place of --hidden)")
    p.add_argument("--depth", metavar="N,N...", help="numbers of hidden layers to try, comma-separated (in place "
                   "of --hidden; default width: that of --hidden)")
    p.add_argument("--exhaustive", action="store_true", help="train every configuration with the full budget "
                   "(no successive halving)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    _add_config_options(p, show_all, SWEEP_LISTS)

    for name, (help, description, own) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("run", metavar="RUN", help="run folder")
        for f in _command_fields(name):
            _add_field(p, f, f.metadata["commands"][name], None)
        for flag, kwargs in own:
            p.add_argument(flag, **kwargs)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def command_settings(args: argparse.Namespace) -> None:
    """A subcommand's Config options, parsed in place as train parses them; every bad one reported together."""
    problems: list[str] = []
    for f in _command_fields(args.command):
        value = getattr(args, f.name)
        if isinstance(value, (str, list)):
            setattr(args, f.name, parse_cli_value(f.name, value, problems))
    if problems:
        raise NnfitError("invalid settings: " + "; ".join(problems))


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
        problems += exc.args[0].removeprefix("invalid settings: ").split("; ")
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
    nnfit.fit(config=config, reporter=_reporter(config.quiet, config.verbose), stop_signals=True)
    return 0


def cmd_sweep(args) -> int:
    import nnfit

    swept = {name: vars(args).pop(name) for name in ("lr", "hidden", "activation") if hasattr(args, name)}
    config = config_from_args(args)
    result = nnfit.sweep(config=config, width=args.width, depth=args.depth, exhaustive=args.exhaustive, **swept)
    print(f"sweep of {len(result.rows)} configurations in {result.seconds:.1f} s, chosen by validation loss "
          "(* marks the winner; rung: how far it went in successive halving)")
    print(result.table())
    s = result.best.summary
    print(f"\nwinner #{s['sweep']['selected']}: {s['recipe']}, hidden {','.join(map(str, result.best.config.hidden))}, "
          f"{result.best.config.activation}")
    if s["sweep"]["default"] is not None:
        beat = "the winner beat it" if s["sweep"]["default"] != s["sweep"]["selected"] else "nothing beat it"
        print(f"#{s['sweep']['default']} is what nnfit train would train with these options: it trained in full "
              f"first, and {beat} on validation loss")
    print(metrics_table({"validation": s.get("validation"), "test": s.get("test")}))
    print(f"run folder: {config.out} ({', '.join(_run_files(config.out))}); it is an ordinary run: nnfit predict, "
          "evaluate, inspect, export and resume take it")
    return 0


def _run_files(folder) -> list[str]:
    from nnfit.runfolder import is_run_file

    return sorted(p.name for p in Path(folder).iterdir() if is_run_file(p.name) and not p.name.startswith("."))


def cmd_resume(args) -> int:
    import nnfit

    nnfit.resume(args.run, data=args.data, quiet=args.quiet, verbose=args.verbose, stop_signals=True,
                 reporter=_reporter(args.quiet, args.verbose))
    return 0


def _reporter(quiet, verbose) -> Reporter:
    """Progress on stderr; the result on stdout, with --quiet too."""
    return Reporter(quiet=bool(quiet), verbose=bool(verbose), results=True, result_stream=sys.stdout)


def cmd_predict(args) -> int:
    import nnfit

    if args.out == "-":  # the Unix convention: standard output, as without --out
        args.out = None
    _check_out(args.out, args.overwrite, data=args.data)
    model = nnfit.load(args.run, device=args.device or "cpu")
    if bool(args.data) == bool(args.input):
        raise NnfitError("both --data and --input were given; give the inputs one way" if args.data else
                         f"no inputs given; pass --data FILE or --input NAME=VALUE (inputs: {', '.join(model.input_names)})")
    if args.std and model.members == 1:
        raise NnfitError(f"--std asks for the spread of an ensemble's members, but {args.run} is a single network, "
                         "so there is no spread to give; train with --ensemble K (K >= 2) for a standard deviation")
    out = model.predict_frame(args.data or _parse_inputs(args.input, model.input_names), out=args.out)
    if args.out:
        print(f"wrote {len(out)} prediction(s) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(out.to_csv(index=False, float_format="%.9g"))
    return 0


def _check_out(out, overwrite: bool, data=None, export: bool = False) -> None:
    """predict --out, export --out: never the input table, never an existing file without --overwrite."""
    if out is None:
        return
    from nnfit.runfolder import check_new_file

    check_new_file(out, overwrite, data=data, export=export)


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
        if name in values:
            raise NnfitError(f"--input {name}=... is given twice; give each input once, with all its values "
                             f"comma-separated: --input {name}=0.1,0.2")
        if "=" in text:  # --input a=0.1,b=0.2: several columns in one --input
            each = " ".join(f"--input {part.strip()}" for part in item.split(","))
            raise NnfitError(f"--input {item!r} gives several columns in one --input; repeat --input per column: "
                             f"{each}")
        try:
            values[name] = [float(v) for v in text.split(",")]
        except ValueError:
            raise NnfitError(f"--input {item!r}: {text!r} is not a number or comma-separated numbers") from None
        if not all(math.isfinite(v) for v in values[name]):
            raise NnfitError(f"--input {item!r} holds a NaN or an infinity; the model predicts from finite numbers "
                             "only: give finite values")
    missing = [n for n in names if n not in values]
    if missing:
        raise NnfitError(f"missing --input for {', '.join(missing)}; the model takes {', '.join(names)}")
    lengths = {len(v) for v in values.values()}
    if len(lengths) > 1:
        raise NnfitError("every --input must give the same number of values")
    return pd.DataFrame(values)


def cmd_evaluate(args) -> int:
    import nnfit

    if args.target and not args.data:
        raise NnfitError("--target names the target column of a table given with --data, and no --data was given; "
                         "pass --data FILE --target NAME, or drop --target (a formula run is scored on fresh points)")
    model = nnfit.load(args.run, device=args.device or "cpu")
    ensemble = model.members > 1
    metrics = model.evaluate(data=args.data, target=args.target, samples=args.samples, seed=args.seed,
                             members=ensemble)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    label = "test" if args.data is None else Path(args.data).name
    if not ensemble:
        print(metrics_table({label: metrics}))
        return 0
    from nnfit.metrics import SPREAD_MEANING

    best = min(range(len(metrics["members"])), key=lambda k: metrics["members"][k]["mse"])
    print(metrics_table({f"{label}: mean": metrics["mean"], f"best member #{best + 1}": metrics["members"][best]}))
    print(f"\n{len(metrics['members'])} members, MSE each: "
          + ", ".join(f"{m['mse']:.3e}" for m in metrics["members"])
          + f"; median {metrics['median_member_mse']:.3e}, the mean's {metrics['mean']['mse']:.3e}")
    spread = metrics["spread"]
    print(f"spread on these points: mean std {spread['mean_std']:.3e}; rank correlation of |error| and std "
          f"(Spearman) {spread['spearman']:.2f}; share within mean ± 2 std {spread['coverage_2sigma']:.1%}")
    print(SPREAD_MEANING)
    return 0


def cmd_inspect(args) -> int:
    import nnfit

    inspection = nnfit.inspect(args.run)
    print(json.dumps(inspection.to_dict(), indent=2) if args.json else inspection.table())
    return 0


def cmd_export(args) -> int:
    import nnfit

    _check_out(args.out, args.overwrite, export=True)
    model = nnfit.load(args.run)
    path = model.export(args.format, args.out)
    targets = f"(batch, {len(model.target_names)}), {', '.join(model.target_names)}"
    outputs = (f"outputs y, the {model.members} members' mean, and y_std, their standard deviation, each of shape "
               f"{targets}" if model.members > 1 else f"output y of shape {targets}")
    print(f"wrote {path}: input x of shape (batch, {len(model.input_names)}), columns "
          f"{', '.join(model.input_names)}; {outputs}; original units")
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_train, "sweep": cmd_sweep, "resume": cmd_resume, "predict": cmd_predict, "evaluate": cmd_evaluate,
            "inspect": cmd_inspect, "export": cmd_export}


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, NnfitWarning):
        print(f"nnfit: warning: {getattr(message, 'cli_message', message.__str__)()}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv=None) -> int:
    # A reader that goes away (nnfit train | head -1, or a closed stderr) must not cost the work: what
    # meets the closed pipe goes to /dev/null and the command finishes (a run is saved all the same).
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeSafe(sys.stdout), PipeSafe(sys.stderr)
    try:
        return _main(argv)
    finally:
        for safe in (sys.stdout, sys.stderr):
            if isinstance(safe, PipeSafe):
                safe.flush()  # what is left meets the closed pipe here, not at exit
        sys.stdout, sys.stderr = streams


def _main(argv=None) -> int:
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
        if args.command in SUBCOMMANDS:
            command_settings(args)
        from nnfit import trainstate

        # SIGINT and SIGTERM stop every command with one line and exit 130 or 143: at once, or when
        # the phase in progress (training, saving a run) has done its work (trainstate.phase).
        with trainstate.handling_signals():
            return COMMANDS[args.command](args)
    except NnfitError as exc:
        if debug:
            raise
        print("nnfit: error: " + " ".join(exc.cli_message().split()), file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"nnfit: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nnfit: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
