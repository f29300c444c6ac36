"""nnfit: teach a fully connected network a function from a formula or a table, then use it.

    >>> import nnfit
    >>> model = nnfit.fit(formula="x**2 + x", domain={"x": (0, 1)}, samples=1000)
    >>> model.predict([[0.5]])

Importing nnfit is cheap: torch is imported on first use of the API.
"""

from nnfit.config import Config
from nnfit.errors import NnfitError, NnfitWarning

__version__ = "0.1.0"
__all__ = ["Config", "FittedModel", "NnfitError", "NnfitWarning", "Regressor", "fit", "inspect", "load", "resume", "sweep"]

_LAZY = {"fit": "nnfit.api", "load": "nnfit.api", "resume": "nnfit.api", "FittedModel": "nnfit.api",
         "Regressor": "nnfit.sklearn", "inspect": "nnfit.freeze", "sweep": "nnfit.sweeps"}


# Modules that `import nnfit` makes reachable as attributes on first use: nnfit.export.export(...).
_SUBMODULES = ("export", "sklearn", "report", "html_report", "freeze", "tables", "checkpoint", "devices", "metrics",
               "model", "formula", "data", "train", "trainstate", "progress", "config", "errors", "api", "launch")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"nnfit.{name}")
    raise AttributeError(f"module 'nnfit' has no attribute {name!r}")
