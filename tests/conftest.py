import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tutorial_run(tmp_path_factory):
    """The tutorial's exercise trained once with defaults and saved: (FittedModel, run folder)."""
    import nnfit

    out = tmp_path_factory.mktemp("runs") / "tutorial"
    model = nnfit.fit(formula="x**2 + x", domain={"x": (0, 1)}, samples=1000, out=str(out), quiet=True)
    return model, out
