"""Where things run. The only module that reads the environment or asks which devices exist."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from nnfit.errors import NnfitError


def available() -> list[str]:
    """The devices that exist here, for error messages."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def parse_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into a device that exists."""
    text = str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        count = torch.cuda.device_count()
        index = int(match.group(1) or 0)
        if count == 0:
            raise NnfitError(f"device {spec!r} was asked for, but this machine has no CUDA GPU; "
                             f"devices here: {', '.join(available())}. Use --device cpu or auto")
        if index >= count:
            raise NnfitError(f"device {spec!r} does not exist: this machine has {count} CUDA GPU(s); "
                             f"devices here: {', '.join(available())}")
        return torch.device("cuda", index)
    if text == "mps":
        if not _mps_available():
            raise NnfitError(f"device 'mps' is not available here; devices here: {', '.join(available())}")
        return torch.device("mps")
    raise NnfitError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps "
                     f"(devices here: {', '.join(available())})")


@dataclass(frozen=True)
class Context:
    """Who this process is in a run: one process, or one rank of a torch.distributed group."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_context(config) -> Context:
    return Context(device=parse_device(config.device))


def cleanup_context(ctx: Context) -> None:
    """Tear down what ``init_context`` set up (nothing in a single process)."""


def to_device(tensor: torch.Tensor, ctx: Context, dtype=None) -> torch.Tensor:
    """Place a tensor (data or a batch) on the run's device: the one place that moves data."""
    return tensor.to(device=ctx.device, dtype=dtype or tensor.dtype)


def place_model(model: torch.nn.Module, ctx: Context, dtype) -> torch.nn.Module:
    """Place the model on the run's device, in the run's dtype."""
    return model.to(device=ctx.device, dtype=dtype)
