"""The network: an MLP whose linear layers are named l1 ... lN, and checks for a user's own module."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

from nnfit import devices
from nnfit.config import ACTIVATION_LAYERS
from nnfit.errors import NnfitError, NnfitWarning
from nnfit.errors import setting as S

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


class StackedLinear(nn.Module):
    """K independent linear layers as one: weight (K, out, in), bias (K, out); (K, b, in) -> (K, b, out)."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed feature-major, as out^T = W @ x^T + b: the weight's gradient, grad(out^T) @ x, then comes
        # out in the weight's own (K, out, in) layout instead of as a transposed copy, and the activations
        # between layers stay (K, features, b) in memory, so no layer copies its input. The result is the
        # (K, b, out) view of that.
        return torch.baddbmm(self.bias.unsqueeze(2), self.weight, x.transpose(1, 2)).transpose(1, 2)


class StackedMLP(nn.Sequential):
    """K MLPs of one shape trained as one computation (an ensemble): every weight gains a leading member
    axis, and each layer is one batched matmul (``torch.baddbmm``) over the members.

    Parameters keep the MLP's names (l1.weight, ..., lN.bias), so --freeze and --lr-for patterns apply to
    every member. The input is (K, b, inputs), one batch per member, or (b, inputs), the same rows for
    all; the output is (K, b, outputs).

    Why baddbmm rather than torch.func.stack_module_state + vmap: on 2 busy CPU cores, K = 8 members of
    1 -> 100 -> 100 -> 1 tanh, one Adam step (forward, backward, fused update), one thread, best of 3:
    baddbmm 15.3 ms and vmap 20.7 ms at batch 64; 130 ms and 123 ms at batch 1024 (within the noise).
    vmap's dispatch costs at the small batches where stacking matters most, and baddbmm needs no
    functional_call: the stacked model is an ordinary module (state_dict, DDP, freezing).
    """

    def __init__(self, members: int, n_inputs: int, n_outputs: int, hidden=(100, 100), activation: str = "tanh"):
        widths = [n_inputs, *hidden, n_outputs]
        layers = OrderedDict()
        for i in range(len(widths) - 1):
            layers[f"l{i + 1}"] = StackedLinear(members, widths[i], widths[i + 1])
            if activation != "none" and i < len(widths) - 2:
                layers[f"act{i + 1}"] = ACTIVATIONS[activation]()
        super().__init__(layers)
        self.members, self.n_inputs, self.n_outputs = members, n_inputs, n_outputs
        self.hidden, self.activation = tuple(hidden), activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the same rows for every member: a view, no copy
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        return super().forward(x)

    @torch.no_grad()
    def init_members(self, seeds) -> "StackedMLP":
        """Member k gets exactly the weights ``MLP(...)`` has when built right after
        ``torch.manual_seed(seeds[k])``; the global random state is left as it was."""
        for k, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                single = MLP(self.n_inputs, self.n_outputs, self.hidden, self.activation)
            self.set_member(k, single)
        return self

    @torch.no_grad()
    def set_member(self, k: int, single: MLP) -> None:
        theirs = single.state_dict()
        for name, tensor in self.state_dict().items():
            tensor[k].copy_(theirs[name])

    def member(self, k: int) -> MLP:
        """Member ``k`` as an ordinary MLP (a copy)."""
        p = next(self.parameters())
        single = MLP(self.n_inputs, self.n_outputs, self.hidden, self.activation).to(p.device, p.dtype)
        single.load_state_dict({name: tensor[k] for name, tensor in self.state_dict().items()})
        return single


def build_mlp(n_inputs: int, n_outputs: int, config) -> MLP | StackedMLP:
    """The run's network: one MLP, or with ``config.ensemble`` K > 1 a StackedMLP whose member k starts
    as the MLP of seed ``config.seed + k`` would (member 0 as the single network of the same seed)."""
    if config.activation == "none":
        warnings.warn(
            f"{S('activation', 'none')} makes the network linear: it can only fit linear functions "
            "(this is the tutorial's bug: its activations are commented out)", NnfitWarning, stacklevel=2)
    members = getattr(config, "ensemble", 1)
    # Checked before allocating, in host memory (where the network is built), by the estimate the training
    # loop checks again on its device: here without the batch and the data, with Adam's two moments.
    estimate = training_memory(n_inputs, n_outputs, config.hidden, members, element_size(config.dtype), moments=2, batch=1, rows=0)
    asked = f" with {S('ensemble', members)}" if members > 1 else ""
    free = devices.free_host_memory()  # read once: the check and the most that fit agree
    fits = "" if members == 1 else f" (the most that fit: {S('ensemble', estimate.largest(free))})"
    devices.check_fits_in_memory(estimate.total(), f"{S('hidden', ','.join(map(str, config.hidden)))}{asked} makes a "
                                 f"network of {members * estimate.parameters:,} parameters, which in {estimate.copies}",
                                 f"use smaller widths{' or fewer members' if members > 1 else ''}{fits}", free)
    if members > 1:
        stacked = StackedMLP(members, n_inputs, n_outputs, config.hidden, config.activation)
        return stacked.init_members([config.seed + k for k in range(members)])
    return MLP(n_inputs, n_outputs, config.hidden, config.activation)


def clip_grad_norm_(params, max_norm: float, members: int = 1) -> None:
    """Clip the gradients' norm to ``max_norm``: over all ``params`` together, or with ``members`` > 1 (a
    StackedMLP's parameters, member axis first) each member's norm over its own slices, so that a member
    is clipped exactly as it would be trained alone. No host sync: CUDA-graph capturable."""
    if members == 1:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([g.reshape(members, -1).float().square().sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ coefficient, per member
    for g in grads:
        g.mul_(scale.to(g.dtype).view(-1, *[1] * (g.dim() - 1)))


# Copies of the parameters that training keeps besides the optimizer's state (train.py): the weights and
# their gradients; the best weights and the starting values (Run); the rollback point of the last good
# epoch (weights, optimizer state, best weights, starting values: Run.keep_point, one, rewritten in place
# every epoch), and at the first epoch's end the point the run started from, still held while that one is
# made: a fresh run's holds no optimizer state yet, a resumed run's does. ``training_memory`` counts the
# resumed case, the larger, adding the optimizer's state to the weights' share of both points.
TRAINING_COPIES = 2 + 2 + 2 * 3
# Activations one row of a batch keeps per unit of each layer's output: the linear map's output, the
# activation's output, and the gradient of one of them while the backward pass runs.
ACTIVATION_COPIES = 3


def parameter_count(n_inputs: int, n_outputs: int, hidden) -> int:
    """Weights and biases of one MLP of these widths, counted without building it (it may not fit)."""
    widths = [n_inputs, *hidden, n_outputs]
    return sum((a + 1) * b for a, b in zip(widths, widths[1:]))


def element_size(dtype: str) -> int:
    """Bytes per number of the run's ``dtype`` setting ("float32", "float64")."""
    return torch.finfo(getattr(torch, dtype)).bits // 8


def training_memory(n_inputs: int, n_outputs: int, hidden, members: int, element_size: int, moments: int,
                    batch: int, rows: int, floor: int = 1, optimizer: str = "adam") -> devices.MemoryEstimate:
    """Bytes to train ``members`` MLPs of this shape, per member: the parameters' copies (weights, gradients,
    ``moments`` copies of optimizer state, the loop's snapshots), the activations per row of a batch of
    ``batch`` rows, and the ``rows`` training rows each member's epoch gathers in its own order. Numbers of
    ``element_size`` bytes. K members need K times as much: nothing is shared among them."""
    widths = [n_inputs, *hidden, n_outputs]
    parameters = parameter_count(n_inputs, n_outputs, hidden)
    copies = TRAINING_COPIES + 3 * moments  # the optimizer's state: live, and in both points
    what = (f"{copies} copies (weights, gradients, {moments} of the optimizer's state, "
            f"{copies - 2 - moments} in the loop's snapshots)")  # "... of its N parameters" follows
    return devices.MemoryEstimate(
        members=members, parameters=parameters, state=parameters * copies * element_size, copies=what,
        rows=rows * (n_inputs + n_outputs) * element_size,
        per_row=ACTIVATION_COPIES * sum(widths[1:]) * element_size, batch=batch, floor=floor,
        widths=tuple(hidden), optimizer=optimizer)


def batch_rows(T: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of (n, d) data, or of each member's (K, n, d) data (a StackedMLP's input)."""
    return T[start:stop] if T.dim() == 2 else T[:, start:stop]


def members(model: nn.Module) -> int:
    """How many networks ``model`` stacks: K for a StackedMLP, 1 for anything else."""
    return getattr(model, "members", 1) if isinstance(model, StackedMLP) else 1


def architecture(model: nn.Module) -> dict:
    """A JSON description that rebuilds the model; custom modules are described by class name."""
    if isinstance(model, (MLP, StackedMLP)):
        arch = {"type": "mlp", "inputs": model.n_inputs, "outputs": model.n_outputs,
                "hidden": list(model.hidden), "activation": model.activation}
        if isinstance(model, StackedMLP):
            arch["members"] = model.members
        return arch
    return {"type": "custom", "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": {name: list(p.shape) for name, p in model.named_parameters()}}


def rebuild(arch: dict) -> MLP | StackedMLP:
    if arch.get("members", 1) > 1:
        return StackedMLP(arch["members"], arch["inputs"], arch["outputs"], tuple(arch["hidden"]), arch["activation"])
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
    except TypeError as exc:  # the class needs arguments: nnfit cannot guess them
        raise NnfitError(f"model={name} could not be built without arguments ({_first_line(exc)}); "
                         f"pass an instance instead: model={name}(...)") from None


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
    name = type(module).__name__
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as exc:  # any failure of the user's forward: one line that says where to look
        first = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        if first is not None and first.in_features != n_in:
            raise NnfitError(
                f"the model's first layer expects {first.in_features} input features, but the data has {cols}; "
                f"build the model with {n_in} input(s) or choose the inputs with {S('inputs')}") from None
        if isinstance(exc, RuntimeError) and "device" in str(exc):
            raise NnfitError(f"the model failed on {device}: {_first_line(exc)}; "
                             f"a tensor of the module is on another device: {device_report(module, device)}") from None
        raise NnfitError(f"{name}.forward failed on a probe batch of shape (2, {n_in}), the data's {cols}: "
                         f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor):
        raise NnfitError(f"the model returned {type(out).__name__}; it must return a tensor of shape (batch, {n_out})")
    if tuple(out.shape) != (2, n_out):
        raise NnfitError(
            f"the model returns shape {tuple(out.shape)} for a batch of 2, but the data has {n_out} "
            f"target{'s' if n_out != 1 else ''} ({', '.join(target_names)}); it must return shape (2, {n_out}), "
            "one column per target")
    # The built-in MLP warns about --activation none itself; a custom module is checked by what it computes.
    if not isinstance(getattr(module, "module", module), MLP) and is_affine(module, n_in, device, dtype):
        warnings.warn(f"{name} is linear: its output is an affine function of its input (checked on random "
                      "points), so it can only fit linear functions; add a nonlinearity such as torch.tanh "
                      f"between its layers (like {S('activation', 'none')}, this is the tutorial's bug: its "
                      "activations are commented out)", NnfitWarning, stacklevel=3)


def is_affine(module: nn.Module, n_in: int, device, dtype) -> bool:
    """Whether ``module`` maps mixtures of inputs to the same mixtures of outputs, f(t a + (1-t) b) =
    t f(a) + (1-t) f(b), on random points: true of an affine map, false of a network with a nonlinearity.
    One forward pass, so that batch statistics and randomness see the points together."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 16, n_in, generator=g, dtype=torch.float64)
    t = torch.rand(16, 1, generator=g, dtype=torch.float64)
    batch = torch.cat([a, b, t * a + (1 - t) * b]).to(device=device, dtype=dtype)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            fa, fb, fm = module(batch).to("cpu", torch.float64).split(16)
    except Exception:  # a module that only takes batches of 2: no verdict
        return False
    finally:
        module.train(was_training)
    scale = float(torch.cat([fa, fb]).abs().max())
    tolerance = 1e-4 if dtype == torch.float64 else 1e-3  # float32 rounding stays below 1e-5 of the scale
    return scale > 0 and float((fm - (t * fa + (1 - t) * fb)).abs().max()) <= tolerance * scale


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
