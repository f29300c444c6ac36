"""The one error family for problems caused by the user's input or settings."""


class NnfitError(Exception):
    """A problem with the user's input, settings or files.

    The message says what was received, what is allowed and what to do.
    The CLI prints it as one line and exits with status 2.
    """


class NnfitWarning(UserWarning):
    """Something worth knowing that does not stop the run."""
