"""Deployable copies of a trained model, ONNX or TorchScript, that take and return original units.

The scaling statistics become buffers of the exported module, so the graph computes
``net((x - x_mean) / x_std) * y_std + y_mean``, and the batch dimension is dynamic.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

import nnfit
from nnfit.checkpoint import atomic_write_bytes
from nnfit.errors import NnfitError
from nnfit.model import _first_line
from nnfit.errors import setting as S

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_OPSET = 17


class Deployable(nn.Module):
    """The trained network between its input scaling and its output unscaling, held as buffers."""

    def __init__(self, module: nn.Module, scaling, dtype: torch.dtype):
        super().__init__()
        self.net = module
        for name, values in scaling.to_dict().items():
            self.register_buffer(name, torch.tensor(values, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.x_mean) / self.x_std) * self.y_std + self.y_mean


class EnsembleDeployable(Deployable):
    """An ensemble's members between the scaling and their mean and standard deviation (Bessel's
    correction, as ``FittedModel.predict(X, return_std=True)``): two outputs, y and y_std."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = super().forward(x)  # (K, batch, targets)
        return members.mean(dim=0), members.std(dim=0)


def export(fitted, format: str, out=None) -> Path:
    """Write ``fitted`` (a FittedModel) as ONNX or TorchScript; returns the file's path.

    Args:
        fitted: from ``nnfit.fit`` or ``nnfit.load``.
        format: ``"onnx"`` (needs ``pip install 'nnfit[export]'``) or ``"torchscript"``.
        out: the file to write (default: ``model.onnx`` or ``model.pt`` in the run folder).

    The model takes one float tensor ``x`` of shape (batch, inputs), columns in the order of
    ``fitted.input_names``, and returns ``y`` of shape (batch, targets), in original units. An ensemble's
    returns the members' mean ``y`` and their standard deviation ``y_std``, both (batch, targets).
    """
    if format not in FORMATS:
        raise NnfitError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if out is not None:
        from nnfit.runfolder import EXPORT_FILES, check_output

        check_output(out, allowed=EXPORT_FILES)
        suffix = Path(out).suffix.lower()
        other = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript"}.get(suffix, format)
        if other != format:
            raise NnfitError(f"--out {out} has the suffix of a {other} file, but --format {format} writes "
                             f"{'ONNX' if format == 'onnx' else 'TorchScript'}; name it "
                             f"{Path(out).with_suffix(SUFFIXES[format]).name}, or pass --format {other}")
    else:
        if fitted.path is None:
            raise NnfitError(f"this model has no run folder; give the file to write: {S('out', 'FILE')}")
        out = Path(fitted.path) / f"model{SUFFIXES[format]}"
    dtype = next(fitted.module.parameters()).dtype
    ensemble = getattr(fitted, "members", 1) > 1
    wrapper = EnsembleDeployable if ensemble else Deployable
    module = wrapper(copy.deepcopy(fitted.module).to("cpu"), fitted.scaling, dtype).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    example = torch.zeros(2, len(fitted.input_names), dtype=dtype)
    meta = {"nnfit_version": nnfit.__version__, "input_names": list(fitted.input_names),
            "target_names": list(fitted.target_names), "dtype": str(dtype).replace("torch.", ""),
            "input": "x: (batch, inputs), columns in the order of input_names, original units",
            "output": "y: (batch, targets), in the order of target_names, original units"
            + ("; the mean of the ensemble's members, and y_std: (batch, targets), their standard deviation"
               if ensemble else "")}
    data = _onnx_bytes(module, example, meta) if format == "onnx" else _torchscript_bytes(module, meta)
    atomic_write_bytes(out, data)
    return Path(out)


def _onnx_bytes(module: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    try:
        import onnx
    except ImportError:
        raise NnfitError("ONNX export needs the onnx package, which is not installed; install it with "
                         "pip install 'nnfit[export]' (onnx and onnxruntime; from a clone: "
                         "pip install -e '.[export]')") from None

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) needs no onnxscript; torch marks it deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        outputs = ["y", "y_std"] if isinstance(module, EnsembleDeployable) else ["y"]
        try:
            torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["x"], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in ["x", *outputs]}, opset_version=ONNX_OPSET)
        except Exception as exc:  # a custom module's operation that the exporter cannot trace or express
            raise NnfitError(f"the model could not be exported to ONNX: {_first_line(exc)[:300]}; a custom module must be "
                             "traceable with plain tensor operations (or try --format torchscript)") from None
    model = onnx.load_from_string(buf.getvalue())
    model.doc_string = (f"nnfit model: inputs {', '.join(meta['input_names'])} -> "
                        f"targets {', '.join(meta['target_names'])}, original units")
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value) if isinstance(value, list) else str(value)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _torchscript_bytes(module: nn.Module, meta: dict) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in favour of torch.export
        try:
            scripted = torch.jit.script(module)
        except Exception:  # a custom module that TorchScript cannot compile: record its operations instead
            try:
                scripted = torch.jit.trace(module, torch.zeros(2, len(meta["input_names"]),
                                                               dtype=getattr(torch, meta["dtype"])))
            except Exception as exc:
                raise NnfitError(f"the model could not be exported to TorchScript: {_first_line(exc)[:300]}; a custom "
                                 "module must be scriptable or traceable") from None
        torch.jit.save(scripted, buf, _extra_files={"nnfit.json": json.dumps(meta)})
    return buf.getvalue()
