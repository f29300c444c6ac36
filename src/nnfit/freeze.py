"""Freezing by name, and the proof that frozen tensors did not move.

A pattern names parameters in one of three ways: an exact parameter name
(``l1.weight``), a layer name (``l1``: every parameter under it) or a glob
(``l*.bias``, matched against parameter names and layer names). Frozen
parameters get ``requires_grad=False`` and never enter the optimizer, so weight
decay, momentum and Adam state cannot move them; after training every frozen
tensor is compared bit for bit with its starting value.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnfit.errors import NnfitError
from nnfit.errors import setting as S


class FrozenTensorChanged(RuntimeError):
    """A frozen tensor moved during training. This is a bug in nnfit, not a user mistake."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper, so that names have no 'module.' prefix."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def matches(name: str, pattern: str) -> bool:
    """Whether parameter ``name`` is named by ``pattern``: exactly, by a layer that holds it, or by a glob."""
    if name == pattern or name.startswith(pattern + "."):
        return True
    parts = name.split(".")
    # A glob may name the parameter itself ('l*.bias') or any layer that holds it ('l[12]').
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def resolve(names, pattern: str, shown: str | None = None) -> list[str]:
    """The parameter names that ``pattern`` names, in model order; none is an error that lists the names."""
    names = list(names)
    found = [n for n in names if matches(n, pattern)]
    if not found:
        raise NnfitError(f"{shown or S('freeze', repr(pattern), repr(pattern))} matches no parameter; the parameters are: {', '.join(names)}. "
                         "Give an exact name (l1.weight), a layer (l1) or a glob ('l*.bias')")
    return found


def freeze(model: nn.Module, patterns) -> list[str]:
    """Freeze the parameters named by ``patterns``; returns every frozen parameter name.

    Raises NnfitError if a pattern matches nothing, or if nothing would be left to train.
    """
    named = dict(unwrap(model).named_parameters())
    chosen = {n for pattern in patterns for n in resolve(named, pattern)}
    for name in chosen:
        named[name].requires_grad_(False)
    frozen = [n for n, p in named.items() if not p.requires_grad]
    if len(frozen) == len(named):
        raise NnfitError(f"{S('freeze', ' '.join(patterns))} freezes every parameter ({', '.join(frozen)}); "
                         "there would be nothing to train. Freeze fewer layers")
    return frozen


def unfreeze_schedule(model: nn.Module, unfreeze_at) -> dict[int, list[str]]:
    """``{epoch: [names]}`` from (epoch, pattern) pairs; each pattern must name frozen parameters."""
    named = dict(unwrap(model).named_parameters())
    frozen = [n for n, p in named.items() if not p.requires_grad]
    schedule: dict[int, list[str]] = {}
    for epoch, pattern in sorted(unfreeze_at):
        found = resolve(named, pattern, S("unfreeze_at", f"{epoch}:{pattern}", repr({epoch: pattern})))
        not_frozen = [n for n in found if named[n].requires_grad]
        if not_frozen:
            raise NnfitError(f"{S('unfreeze_at', f'{epoch}:{pattern}', repr({epoch: pattern}))} names {', '.join(not_frozen)}, which "
                             f"{'is' if len(not_frozen) == 1 else 'are'} not frozen; frozen parameters are: "
                             f"{', '.join(frozen) or 'none'}. Freeze them with {S('freeze')} first")
        earlier = {n for names in schedule.values() for n in names}
        schedule.setdefault(epoch, []).extend(n for n in found if n not in earlier)
    return {e: names for e, names in schedule.items() if names}


def lr_of(name: str, lr_for, default: float) -> float:
    """The learning rate of one parameter: the last ``--lr-for`` pattern that names it wins."""
    lr = default
    for pattern, value in lr_for:
        if matches(name, pattern):
            lr = value
    return lr


def check_lr_for(model: nn.Module, lr_for, will_train) -> None:
    """Every ``--lr-for`` pattern must name a parameter that trains at some point."""
    named = [n for n, _ in unwrap(model).named_parameters()]
    for pattern, value in lr_for:
        found = resolve(named, pattern, S("lr_for", f"{pattern}={value:g}", repr({pattern: value})))
        if not any(n in will_train for n in found):
            raise NnfitError(f"{S('lr_for', f'{pattern}={value:g}', repr({pattern: value}))} names only frozen parameters ({', '.join(found)}), "
                             f"so it would change nothing; unfreeze them with {S('unfreeze_at')} or drop {S('lr_for')}")


def param_groups(named_params, lr_for, default_lr: float) -> list[dict]:
    """Parameter groups of the trainable parameters, one per distinct learning rate, in model order."""
    groups: dict[float, list] = {}
    for name, p in named_params:
        if p.requires_grad:
            groups.setdefault(lr_of(name, lr_for, default_lr), []).append(p)
    return [{"params": params, "lr": lr} for lr, params in groups.items()]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, on the parameter's device: the starting values that movement is measured from."""
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (unlike ``torch.equal``, -0.0 differs from 0.0 and NaN equals the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_bytes = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    return torch.equal(as_bytes(a), as_bytes(b.to(a.device)))


def verify_unchanged(tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor], names, when: str) -> None:
    """Raise FrozenTensorChanged if any frozen tensor differs from its starting value by a single bit."""
    moved = [n for n in names if not bit_identical(tensors[n], start[n])]
    if moved:
        raise FrozenTensorChanged(
            f"frozen parameter(s) {', '.join(moved)} changed {when}; this is a bug in nnfit, please report it")


def movement(model: nn.Module, start: dict[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of (current - start) per parameter (one host sync for all of them).

    ``start`` may sit elsewhere (a state read from disk is on the CPU): each value is brought to its
    parameter's device and dtype, never the parameter to the start's.
    """
    named = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        norms = torch.stack([(p.detach() - start[n].to(device=p.device, dtype=p.dtype)).double().norm()
                             for n, p in named.items()])
    return dict(zip(named, norms.tolist()))


def grad_norms(model: nn.Module) -> dict[str, float | None]:
    """Gradient norm of each parameter as it stands now (None where there is no gradient)."""
    named = dict(unwrap(model).named_parameters())
    with_grad = [n for n, p in named.items() if p.grad is not None]
    values = torch.stack([named[n].grad.detach().double().norm() for n in with_grad]).tolist() if with_grad else []
    found = dict(zip(with_grad, values))
    return {n: found.get(n) for n in named}


def summary_line(frozen) -> str:
    return f"{', '.join(frozen)} (unchanged)"


# --- inspect ----------------------------------------------------------------------------------------

@dataclass
class Inspection:
    """One row per parameter: name, shape, elements, trainable or frozen, the gradient norm at the
    last training step and how far it moved from its starting value (L2 norm of the change).

    ``print(inspection)`` shows the table; ``rows`` holds the same values as dicts.
    """

    rows: list[dict]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return sum(r["numel"] for r in self.rows if r["trainable"])

    @property
    def frozen(self) -> int:
        return sum(r["numel"] for r in self.rows if not r["trainable"])

    def to_dict(self) -> dict:
        return {"source": self.source, "parameters": self.rows,
                "totals": {"trainable": self.trainable, "frozen": self.frozen}}

    def table(self) -> str:
        head = ("parameter", "shape", "elements", "state", "grad norm (last step)", "moved from start")
        body = [(r["name"], "(" + ", ".join(map(str, r["shape"])) + ("," if len(r["shape"]) == 1 else "") + ")",
                 f"{r['numel']:,}", _state(r), _number(r.get("grad_norm")), _number(r.get("moved")))
                for r in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        left = (0, 1, 3)

        def line(cells):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        n_train = sum(1 for r in self.rows if r["trainable"])
        lines = [line(head), "-" * len(line(head)), *map(line, body), "",
                 f"trainable: {self.trainable:,} parameters in {n_train} tensor(s); "
                 f"frozen: {self.frozen:,} parameters in {len(self.rows) - n_train} tensor(s)"]
        return "\n".join([*lines, *self.notes])

    def __str__(self) -> str:
        return self.table()

    __repr__ = __str__


def _state(row: dict) -> str:
    if not row["trainable"]:
        return "frozen"
    return f"trainable (from epoch {row['unfrozen_at']})" if row.get("unfrozen_at") else "trainable"


def _number(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.4e}"


def parameter_rows(model: nn.Module, grads=None, moved=None, unfrozen_at=None) -> list[dict]:
    """The rows ``inspect`` shows, from a module and what training recorded about it."""
    grads, moved, unfrozen_at = grads or {}, moved or {}, unfrozen_at or {}
    rows = []
    for name, p in unwrap(model).named_parameters():
        row = {"name": name, "shape": list(p.shape), "numel": p.numel(), "trainable": p.requires_grad,
               "grad_norm": grads.get(name), "moved": moved.get(name)}
        if name in unfrozen_at:
            row["unfrozen_at"] = unfrozen_at[name]
        rows.append(row)
    return rows


def inspect(model_or_run) -> Inspection:
    """What trains and what is frozen, for a run folder, a fitted model or a torch module.

    Args:
        model_or_run: a run folder (path), a ``FittedModel`` or a ``torch.nn.Module``.

    Returns:
        An Inspection: ``print`` it for the table, or read ``rows`` and the ``trainable`` and
        ``frozen`` totals. For a run folder or a fitted model the gradient norm at the last step
        and the distance moved come from training; for a bare module the gradient norm is that of
        its current ``.grad`` and the distance moved is unknown ('-').
    """
    if isinstance(model_or_run, (str, Path)):
        return _inspect_run(Path(model_or_run))
    if isinstance(model_or_run, nn.Module):
        return Inspection(parameter_rows(model_or_run, grads=grad_norms(model_or_run)),
                          source=type(model_or_run).__name__)
    module = getattr(model_or_run, "module", None)
    if not isinstance(module, nn.Module):
        raise NnfitError(f"inspect takes a run folder, a fitted model or a torch.nn.Module, "
                         f"got {type(model_or_run).__name__}")
    recorded = {r["name"]: r for r in (getattr(model_or_run, "summary", None) or {}).get("parameter_table", [])}
    rows = parameter_rows(module)
    for row in rows:
        before = recorded.get(row["name"], {})
        row.update({k: before[k] for k in ("grad_norm", "moved", "unfrozen_at") if k in before})
    path = getattr(model_or_run, "path", None)
    return Inspection(rows, source=str(path) if path else repr(model_or_run), notes=_notes(recorded))


def _inspect_run(folder: Path) -> Inspection:
    from nnfit import runfolder

    run = runfolder.read_run(folder)  # every file and field checked, parameter_table names included
    state, meta, summary = run.weights, run.meta, run.summary
    recorded = {r["name"]: r for r in summary.get("parameter_table", [])}
    frozen = set(meta.get("frozen", []))
    arch = meta["architecture"]
    parameters = list(arch["parameters"]) if arch["type"] != "mlp" else list(state)  # a custom module's buffers: not
    names = [*recorded, *(n for n in parameters if n not in recorded)]  # every parameter, whatever summary lists
    rows = []
    for name in names:
        tensor = state[name]
        row = {"name": name, "shape": list(tensor.shape), "numel": tensor.numel(), "trainable": name not in frozen,
               "grad_norm": None, "moved": None}
        row.update({k: v for k, v in recorded.get(name, {}).items() if k in ("grad_norm", "moved", "unfrozen_at")})
        rows.append(row)
    return Inspection(rows, source=str(folder), notes=_notes(recorded))


def _notes(recorded: dict) -> list[str]:
    if recorded:
        return []
    return ["(no training record: gradient norms and movement are unknown)"]
