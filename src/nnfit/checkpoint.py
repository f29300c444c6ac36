"""Saved models: safetensors for tensors, JSON for everything else, every write atomic.

Nothing here ever unpickles: a run folder from a stranger can be loaded safely.
"""

from __future__ import annotations

import errno
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
    global _writes
    from nnfit import devices

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that cannot exist (/proc/x, a file in the way, no permission)
        raise NnfitError(f"could not create the folder {path.parent} to write {path.name}: {_reason(exc)}; "
                         "choose another place to write") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; the result gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _writes += 1
        if devices.fault("kill-during-save") == _writes:  # test hook: a crash between write and rename
            devices.kill_self()
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise NnfitError(f"could not write {path}: {_reason(exc)}; the previous file, if any, "
                             "is unchanged") from None
        raise
    _fsync_dir(path.parent)


_UMASK = os.umask(0o022)
os.umask(_UMASK)
_writes = 0  # atomic writes by this process, for the NNFIT_FAULT=kill-during-save:N test hook


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device (the disk is full); free some space and run again"
    return exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))


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
    entry = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    state = _read_verified(folder / WEIGHTS, entry.get("sha256"), folder / META,
                           "the run folder is incomplete", "retrain or restore the run folder")
    return state, meta


def _read_verified(path: Path, expected_sha256, named_in: Path, missing: str, remedy: str) -> dict:
    """Read a safetensors file whose SHA-256 is recorded in ``named_in``; every failure is an NnfitError."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        blob = path.read_bytes()
    except OSError:
        raise NnfitError(f"{path} (named in {named_in}) is missing or unreadable; {missing}") from None
    if expected_sha256 != sha256(blob):
        raise NnfitError(f"{path} does not match the checksum in {named_in}: the file is truncated, corrupted "
                         f"or was replaced; {remedy}")
    try:
        return load(blob)
    except (SafetensorError, ValueError, OSError) as exc:
        raise NnfitError(f"{path} could not be read as safetensors: {exc}") from None


# Training state: what `nnfit resume RUN` continues from.

STATE = "state.json"
STATE_VERSION = 1


def write_state(folder, tensors: dict, info: dict, number: int) -> None:
    """Save a training state: ``tensors`` to ``state-NUMBER.safetensors``, then ``state.json`` with the
    rest and that file's SHA-256, then remove the previous tensor file.

    ``state.json`` is renamed into place last and always names a complete tensor file, so a crash
    at any point leaves the previous state or the new one, never a mix of the two.
    """
    from safetensors.torch import save

    folder = Path(folder)
    name = f"state-{number:06d}.safetensors"
    blob = save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                metadata={"format": "nnfit-state", "format_version": str(STATE_VERSION)})
    atomic_write_bytes(folder / name, blob)
    write_json(folder / STATE, {"format_version": STATE_VERSION, "tensors": {"file": name, "sha256": sha256(blob)},
                                **info})
    for old in [*folder.glob("state-*.safetensors"), *folder.glob(".state*.tmp")]:
        if old.name != name:  # older states, and the temporary files of a save that was killed
            old.unlink(missing_ok=True)


def has_state(folder) -> bool:
    return (Path(folder) / STATE).exists()


def remove_state(folder) -> None:
    """Delete the training state once the run folder holds the finished model."""
    folder = Path(folder)
    (folder / STATE).unlink(missing_ok=True)
    for old in [*folder.glob("state-*.safetensors"), *folder.glob(".state*.tmp")]:
        old.unlink(missing_ok=True)


def read_state(folder) -> tuple[dict, dict]:
    """Read and verify a training state; returns (tensors on the CPU, the rest)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NnfitError(f"run folder {folder} does not exist" if not folder.exists() else
                         f"{folder} is not a run folder; pass the --out folder of a training run")
    path = folder / STATE
    if not path.exists():
        if (folder / WEIGHTS).exists():
            raise NnfitError(f"{folder} has no training state to resume ({STATE}): the run finished and "
                             f"{WEIGHTS} is its result; start a new run with nnfit train to train more")
        raise NnfitError(f"{folder} has no training state ({STATE}): the run was stopped before its first "
                         "checkpoint, or this is not a run folder; start it again with nnfit train")
    info = read_json(path, "training state")
    if not isinstance(info, dict):
        info = {}
    version = info.get("format_version")
    if version != STATE_VERSION:
        raise NnfitError(f"{path} has format version {version}, but this nnfit reads training states of "
                         f"version {STATE_VERSION} (saved by nnfit {info.get('nnfit_version', '?')}); "
                         "resume it with that nnfit, or start again")
    entry = info.get("tensors") if isinstance(info.get("tensors"), dict) else {}
    tensors_path = folder / Path(str(entry.get("file", ""))).name
    tensors = _read_verified(tensors_path, entry.get("sha256"), path, "the training state is damaged: start the "
                             "run again", "the training state cannot be used: start the run again")
    return tensors, info


def pack(obj, prefix: str, tensors: dict):
    """Nested dicts, lists and tuples with tensors (an optimizer's state_dict) -> JSON-able data; each
    tensor goes into ``tensors`` under a key made from its path and is replaced by a reference."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, pack(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save {type(obj).__name__} at {prefix} in a training state")


def unpack(obj, tensors: dict):
    """The inverse of ``pack``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj
