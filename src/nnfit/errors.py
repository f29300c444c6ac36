"""The one error family for problems caused by the user's input or settings.

A message names a setting through ``setting(name, value)``; it is rendered when shown: ``--batch-size 64``
on the command line (``NnfitError.cli_message``), ``batch_size=64`` in Python (``str(error)``). So one
message serves both, and each speaks the caller's language.
"""

import json
import re

_MARK = "\x1f"
_SETTING = re.compile(_MARK + "(.*?)" + _MARK)
_PLAIN = re.compile(r"[A-Z][A-Z_:=.]*|-?[0-9][0-9.e+-]*")  # placeholders (NAME, LOW:HIGH) and numbers
CLI_FLAGS = {"plots": "--no-plots"}


def setting(name: str, value=None, python=None) -> str:
    """A setting in a message: ``--name value`` on the command line, ``name=value`` in Python.

    ``value`` is the CLI text; ``python`` its Python form when that differs (default: the text quoted,
    unless it is a number or a placeholder such as NAME).
    """
    return _MARK + json.dumps([name, value, python]) + _MARK


def render(message: str, style: str = "python") -> str:
    def one(match):
        name, value, python = json.loads(match.group(1))
        if style == "cli":
            flag = CLI_FLAGS.get(name, "--" + name.replace("_", "-"))
            return flag if value is None else f"{flag} {value}"
        if value is None:
            return name
        if python is None:
            python = value if _PLAIN.fullmatch(str(value)) else repr(value)
        return f"{name}={python}"

    return _SETTING.sub(one, message)


class _Rendered:
    def __str__(self) -> str:
        return render(super().__str__(), "python")

    def cli_message(self) -> str:
        return render(super().__str__(), "cli")


class NnfitError(_Rendered, Exception):
    """A problem with the user's input, settings or files.

    The message says what was received, what is allowed and what to do.
    The CLI prints it as one line and exits with status 2.
    """


class NnfitWarning(_Rendered, UserWarning):
    """Something worth knowing that does not stop the run."""


class TrainingDiverged(NnfitError):
    """The loss stayed non-finite after every rollback with a halved learning rate.

    ``result`` is the run's ``TrainResult``; the model already holds the best weights.
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after the training state was saved.

    A KeyboardInterrupt, so that ``except Exception`` does not swallow it. ``exit_code`` is
    128 + the signal number (130 for SIGINT, 143 for SIGTERM). ``at_once``: a second signal stopped it
    without saving.
    """

    def __init__(self, message: str, exit_code: int, at_once: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.at_once = at_once
