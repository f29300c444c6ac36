"""The network: an MLP whose linear layers are named l1 ... lN, and checks for a user's own module."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

from nnfit.config import ACTIVATION_LAYERS
from nnfit.errors import NnfitError, NnfitWarning

ACTIVATIONS = {name: getattr(nn, layer) for name, layer in ACTIVATION_LAYERS.items()}


class MLP(nn.Sequential):
    """inputs -> hidden... -> outputs. Parameters are named l1.weight, l1.bias, ..., lN.bias."""

    def __init__(self, n_inputs: int, n_outputs: int, hidden=(100, 100), activation: str = "tanh"):
        widths = [n_inputs, *hidden, n_outputs]
        layers = OrderedDict()
        for i in range(len(widths) - 1):
            layers[f"l{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
            if activation != "none" and i < len(widths) - 2:
                layers[f"act{i + 1}"] = ACTIVATIONS[activation]()
        super().__init__(layers)
        self.n_inputs, self.n_outputs = n_inputs, n_outputs
        self.hidden, self.activation = tuple(hidden), activation


def build_mlp(n_inputs: int, n_outputs: int, config) -> MLP:
    if config.activation == "none":
        warnings.warn(
            "--activation none makes the network linear: it can only fit linear functions "
            "(this is the tutorial's bug: its activations are commented out)", NnfitWarning, stacklevel=2)
    return MLP(n_inputs, n_outputs, config.hidden, config.activation)


def architecture(model: nn.Module) -> dict:
    """A JSON description that rebuilds the model; custom modules are described by class name."""
    if isinstance(model, MLP):
        return {"type": "mlp", "inputs": model.n_inputs, "outputs": model.n_outputs,
                "hidden": list(model.hidden), "activation": model.activation}
    return {"type": "custom", "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": {name: list(p.shape) for name, p in model.named_parameters()}}


def rebuild(arch: dict) -> MLP:
    return MLP(arch["inputs"], arch["outputs"], tuple(arch["hidden"]), arch["activation"])


def instantiate(model) -> nn.Module:
    """Accept a module, or a class / zero-argument factory that builds one (so that a missing
    ``super().__init__()`` can be explained instead of surfacing as a bare AttributeError)."""
    if isinstance(model, nn.Module) or not callable(model):
        return model
    name = getattr(model, "__name__", type(model).__name__)
    try:
        return model()
    except AttributeError as exc:
        if "before Module.__init__() call" in str(exc):
            raise NnfitError(f"{name}.__init__ never called super().__init__() before assigning layers; "
                             "add super().__init__() as the first line of its __init__ (the tutorial's pitfall)") from None
        raise


def check_module(module, input_names, target_names, device, dtype) -> None:
    """One forward pass on a small batch, so that a mismatch is explained before training starts."""
    if not isinstance(module, nn.Module):
        raise NnfitError(f"model must be a torch.nn.Module, got {type(module).__name__}")
    if "_parameters" not in module.__dict__ or "_modules" not in module.__dict__:
        raise NnfitError(
            f"{type(module).__name__}.__init__ never called super().__init__(); "
            "add super().__init__() as the first line of its __init__ (the tutorial's pitfall)")
    if not any(p.requires_grad for p in module.parameters()):
        raise NnfitError(f"{type(module).__name__} has no trainable parameters; there is nothing to train")
    if device is None:  # structure only: the module is not placed yet
        return
    n_in, n_out = len(input_names), len(target_names)
    cols = f"{n_in} column{'s' if n_in != 1 else ''} ({', '.join(input_names)})"
    probe = torch.zeros(2, n_in, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out = module(probe)
    except RuntimeError as exc:
        first = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        if first is not None and first.in_features != n_in:
            raise NnfitError(
                f"the model's first layer expects {first.in_features} input features, but the data has {cols}; "
                f"build the model with {n_in} input(s) or choose the inputs with --inputs") from None
        if "device" in str(exc):
            raise NnfitError(f"the model failed on {device}: {_first_line(exc)}; "
                             f"a tensor of the module is on another device: {device_report(module, device)}") from None
        raise NnfitError(f"the model failed on a batch of shape (2, {n_in}) from {cols}: {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor):
        raise NnfitError(f"the model returned {type(out).__name__}; it must return a tensor of shape (batch, {n_out})")
    if tuple(out.shape) != (2, n_out):
        raise NnfitError(
            f"the model returns shape {tuple(out.shape)} for a batch of 2, but the data has {n_out} "
            f"target{'s' if n_out != 1 else ''} ({', '.join(target_names)}); it must return shape (2, {n_out}), "
            "one column per target")


def device_report(module: nn.Module, device) -> str:
    """Name the parameters and buffers that are not on ``device``."""
    device = torch.device(device)
    # Plain tensor attributes (self.shift = torch.ones(1)) are not moved by .to(): the usual culprit.
    attributes = [(f"{prefix}.{key}" if prefix else key, value) for prefix, sub in module.named_modules()
                  for key, value in vars(sub).items() if isinstance(value, torch.Tensor)]
    wrong = [f"{name} is on {t.device}" for name, t in [*module.named_parameters(), *module.named_buffers(), *attributes]
             if t.device.type != device.type]
    return ", ".join(wrong) or "none of its registered tensors (look for a tensor created in forward)"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
