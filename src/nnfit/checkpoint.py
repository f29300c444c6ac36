"""Saved models: safetensors for tensors, JSON for everything else, every write atomic.

Nothing here ever unpickles: a run folder from a stranger can be loaded safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from nnfit.errors import NnfitError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old complete file or the new complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise NnfitError(f"could not write {path}: {exc.strerror or exc}; "
                             "the previous file, if any, is unchanged") from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path, what: str = "file") -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise NnfitError(f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NnfitError(f"{what} {path} is not valid JSON ({exc}); the run folder is damaged") from None
    except OSError as exc:
        raise NnfitError(f"could not read {path}: {exc.strerror or exc}") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_weights(folder, state: dict, meta: dict) -> None:
    """Write ``model.safetensors`` then ``model.json`` (which records the weights' SHA-256)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    blob = save(tensors, metadata={"format": "nnfit", "format_version": str(FORMAT_VERSION)})
    folder = Path(folder)
    atomic_write_bytes(folder / WEIGHTS, blob)
    write_json(folder / META, {**meta, "format_version": FORMAT_VERSION,
                               "weights": {"file": WEIGHTS, "sha256": sha256(blob)}})


def load_weights(folder) -> tuple[dict, dict]:
    """Read and verify a run folder's weights; returns (state_dict on the CPU, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    if not folder.exists():
        raise NnfitError(f"run folder {folder} does not exist; pass the --out folder of a training run")
    if not folder.is_dir():
        raise NnfitError(f"{folder} is not a run folder; pass the folder that holds {META} and {WEIGHTS}")
    meta = read_json(folder / META, "model metadata")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise NnfitError(f"{folder / META} has format version {version}, but this nnfit "
                         f"reads version {FORMAT_VERSION} (saved by nnfit {meta.get('nnfit_version', '?')})")
    weights = folder / WEIGHTS
    try:
        blob = weights.read_bytes()
    except FileNotFoundError:
        raise NnfitError(f"{weights} is missing; the run folder is incomplete") from None
    expected = meta.get("weights", {}).get("sha256")
    if expected != sha256(blob):
        raise NnfitError(f"{weights} does not match the checksum in {META}: the file is truncated, corrupted "
                         "or was replaced; retrain or restore the run folder")
    try:
        state = load(blob)
    except (SafetensorError, ValueError, OSError) as exc:
        raise NnfitError(f"{weights} could not be read as safetensors: {exc}") from None
    return state, meta
