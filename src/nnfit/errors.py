"""The one error family for problems caused by the user's input or settings."""


class NnfitError(Exception):
    """A problem with the user's input, settings or files.

    The message says what was received, what is allowed and what to do.
    The CLI prints it as one line and exits with status 2.
    """


class NnfitWarning(UserWarning):
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
