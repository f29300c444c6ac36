"""Load samples of a function (input columns and target columns) from a file or DataFrame."""

from __future__ import annotations

import csv
import difflib
import math
import os
import zipfile
from collections import Counter
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nnfit.errors import NnfitError, NnfitWarning
from nnfit.errors import setting as S

MAX_BYTES = 4 * 1024**3
# More columns than this is no function to fit by a fully connected network: refuse before parsing them all.
MAX_COLUMNS = 10_000
# A compressed .npz member that expands more than this past the floor is a decompression bomb, not data:
# real float tables compress 1-10x; 1.5 MB growing to 1.86 GB (1240x) is refused before decompressing.
MAX_EXPANSION = 100
BOMB_FLOOR = 64 * 1024**2

_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npy": "npy",
    ".npz": "npz",
}
_LABELS = {
    "csv": "CSV",
    "tsv": "TSV",
    "parquet": "Parquet",
    "npy": "a NumPy .npy file",
    "npz": "a NumPy .npz archive",
}
_MAX_SHOWN = 5


@dataclass(frozen=True, eq=False)
class Table:
    """Samples ready for fitting: one row per sample, all values finite float64."""

    X: np.ndarray
    Y: np.ndarray
    input_names: tuple[str, ...]
    target_names: tuple[str, ...]
    source: str


def load_table(source, target=None, inputs=None, *, min_rows: int = 2, purpose: str = "to fit a function") -> Table:
    """Load input and target columns from a file or a DataFrame.

    Args:
        source: Path to a .csv, .tsv/.tab, .parquet/.pq, .npy or .npz file, or a
            pandas DataFrame. A .npy array's columns are named x1..x{d} and its
            last column y; a .npz archive holds arrays ``X`` (inputs x1..x{d})
            and ``y`` (target y, or y1..y{k} for several).
        target: Target column name(s): a name, comma-separated names ("y1,y2")
            or a sequence of names. Required for tables; defaults to the y
            column(s) for .npy and .npz.
        inputs: Input column name(s), given like ``target``. Defaults to every
            other column that holds numbers; wholly non-numeric columns are
            skipped with a warning.
        min_rows: The fewest rows accepted; ``purpose`` says what they are needed for, in the error.

    Returns:
        A Table whose X has shape (n, d) and Y shape (n, k), both float64.

    Raises:
        NnfitError: The source cannot be read, a column is missing or
            repeated, or a selected value is not a finite number.

    Warns:
        NnfitWarning: A non-numeric column is skipped, or a target is constant.
    """
    if isinstance(source, pd.DataFrame):
        name = "the DataFrame"
        frame = source.set_axis([str(c) for c in source.columns], axis=1)
        _check_duplicates(list(frame.columns), name)
        default_target = None
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        frame, default_target = _read_file(name)
    else:
        raise NnfitError(
            f"source must be a file path or a pandas DataFrame, not {type(source).__name__}"
        )
    _check_width(frame.shape[1], name)
    if frame.shape[1] == 0:
        raise NnfitError(f"{name} is empty: it has no columns; give data with at least one column")
    if len(frame) < min_rows:
        raise NnfitError(
            f"{name} has {len(frame)} rows; at least {min_rows} are needed {purpose}"
        )
    target_names, input_names, numbers = _select_columns(
        frame, name, target, inputs, default_target
    )
    X, Y = _check_values(numbers, name, input_names, target_names)
    return Table(X, Y, input_names, target_names, name)


def _read_file(path: str) -> tuple[pd.DataFrame, list[str] | None]:
    """Read a file into a DataFrame, with the default target for array formats."""
    if not os.path.exists(path):
        raise NnfitError(f"file not found: {path}; check the path and the working directory")
    if os.path.isdir(path):
        raise NnfitError(f"{path} is a directory, not a file; give the path of a data file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _FORMATS:
        raise NnfitError(
            f"{path} has suffix {suffix or '(none)'!r}, which nnfit cannot read; "
            f"supported suffixes are {', '.join(_FORMATS)}"
        )
    fmt = _FORMATS[suffix]
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise NnfitError(
            f"{path} is {_size(size)}; nnfit reads tables up to {_size(MAX_BYTES)} into memory; "
            "use a smaller sample of the data"
        )
    if size == 0:
        raise NnfitError(f"{path} is empty (0 bytes); give a file with data")
    try:
        with open(path, "rb") as file:
            head = file.read(8192)
        if fmt in ("csv", "tsv"):
            return _read_text(path, head, sep="," if fmt == "csv" else "\t"), None
        if fmt == "parquet":
            return _read_parquet(path), None
        if fmt == "npy":
            return _read_npy(path, head)
        return _read_npz(path, head)
    except NnfitError:
        raise
    except PermissionError as exc:
        raise NnfitError(f"no permission to read {path}; check the file's permissions") from exc
    except pd.errors.EmptyDataError as exc:
        raise NnfitError(f"{path} is empty: it has no columns; give a header row and data") from exc
    except UnicodeDecodeError as exc:
        raise NnfitError(
            f"could not read {path} as {_LABELS[fmt]}: it is not UTF-8 text "
            f"(byte {exc.object[exc.start:exc.start + 1]!r} at position {exc.start}); "
            "save it as UTF-8"
        ) from exc
    # numpy, zipfile and pyarrow raise many unrelated types on damaged files (SyntaxError,
    # zlib.error, struct.error, ...), so any other failure here means an unreadable file.
    except Exception as exc:
        reason = " ".join(str(exc).split()).removeprefix("Error tokenizing data. C error: ")
        reason = reason[:200] or type(exc).__name__
        if "allow_pickle" in reason:
            raise NnfitError(
                f"{path} holds Python objects (dtype object), which would need pickle to load; "
                "nnfit never loads pickles; save an array of numbers instead"
            ) from exc
        hint = "; every row needs one value per header column" if "fields" in reason else ""
        raise NnfitError(f"could not read {path} as {_LABELS[fmt]}: {reason}{hint}") from exc


def _read_text(path: str, head: bytes, sep: str) -> pd.DataFrame:
    label = "CSV" if sep == "," else "TSV"
    if b"\x00" in head:
        raise NnfitError(
            f"could not read {path} as {label}: it looks like a binary file (it contains NUL "
            "bytes), not text; give a UTF-8 text table (save UTF-16 text as UTF-8)"
        )
    _check_width(_header_width(path, sep), path)
    # Read the header on its own, as pandas renames repeated names to "a.1".
    header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False)
    _check_duplicates([str(c).strip() for c in header.iloc[0] if str(c).strip()], path)
    try:
        with warnings.catch_warnings():
            # By default pandas silently makes extra fields an index; index_col=False only warns.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, sep=sep, index_col=False, low_memory=False)
    except pd.errors.ParserWarning as exc:
        raise NnfitError(
            f"could not read {path} as {label}: the first data row has more fields than the "
            f"{header.shape[1]} in the header; every row needs one value per header column"
        ) from exc
    return frame.set_axis([str(c).strip() for c in frame.columns], axis=1)


def _header_width(path: str, sep: str) -> int:
    """The number of fields in the first line, counted by the csv module (linear, and fast in C)."""
    csv.field_size_limit(MAX_BYTES)
    with open(path, newline="", encoding="utf-8") as file:
        return len(next(csv.reader(file, delimiter=sep), []))


def _check_width(columns: int, name: str) -> None:
    if columns > MAX_COLUMNS:
        raise NnfitError(
            f"{name} has {columns:,} columns; nnfit fits tables of up to {MAX_COLUMNS:,} columns "
            "(inputs and targets); select the columns you need before fitting"
        )


def _read_parquet(path: str) -> pd.DataFrame:
    schema = pq.read_schema(path)
    _check_width(len(schema.names), path)
    _check_duplicates(schema.names, path)
    for field in schema:
        if pa.types.is_nested(field.type):
            raise NnfitError(
                f"column {field.name!r} in {path} has nested type {field.type}; "
                "nnfit needs flat numeric columns; flatten or drop it"
            )
    return pd.read_parquet(path, engine="pyarrow")


def _read_npy(path: str, head: bytes) -> tuple[pd.DataFrame, list[str]]:
    if not head.startswith(b"\x93NUMPY"):
        raise NnfitError(
            f"could not read {path} as {_LABELS['npy']}: it does not start with the .npy header; "
            "save it with numpy.save"
        )
    with open(path, "rb") as file:
        array = np.load(file, allow_pickle=False)
    if array.ndim != 2:
        raise NnfitError(
            f"{path} holds a {array.ndim}-D array of shape {array.shape}; nnfit needs a 2-D array "
            "with one row per sample, the inputs in the first columns and the target in the last"
        )
    _check_dtype(array, path)
    _check_width(array.shape[1], path)
    width = array.shape[1]
    names = [f"x{i}" for i in range(1, width)] + ["y"] if width else []
    return pd.DataFrame(array, columns=names), ["y"]


def _read_npz(path: str, head: bytes) -> tuple[pd.DataFrame, list[str]]:
    if not head.startswith(b"PK"):
        raise NnfitError(
            f"could not read {path} as {_LABELS['npz']}: it is not a zip archive; "
            "save it with numpy.savez(path, X=inputs, y=targets)"
        )
    with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        for key in ("X", "y"):
            if key not in members:
                held = ", ".join(members) or "no arrays"
                raise NnfitError(
                    f"{path} has no array {key!r}; it holds: {held}; "
                    "save it with numpy.savez(path, X=inputs, y=targets)"
                )
        _check_expansion([members["X"], members["y"]], path)
        X, y = (_read_member(archive, members[key], f"array {key!r} in {path}") for key in ("X", "y"))
    for key, array in (("X", X), ("y", y)):
        if not isinstance(array, np.ndarray):
            raise NnfitError(
                f"array {key!r} in {path} is not a .npy array; save it with numpy.savez"
            )
        if array.ndim not in (1, 2):
            raise NnfitError(
                f"array {key!r} in {path} has shape {array.shape}; it must be 1-D or 2-D "
                "with one row per sample"
            )
        _check_dtype(array, f"array {key!r} in {path}")
    if len(X) != len(y):
        raise NnfitError(
            f"in {path}, X has {len(X)} rows but y has {len(y)} "
            f"(shapes {X.shape} and {y.shape}); they need one row per sample each"
        )
    X, y = X.reshape(len(X), -1), y.reshape(len(y), -1)
    _check_width(X.shape[1] + y.shape[1], path)
    x_names = [f"x{i}" for i in range(1, X.shape[1] + 1)]
    y_names = ["y"] if y.shape[1] == 1 else [f"y{i}" for i in range(1, y.shape[1] + 1)]
    frame = pd.DataFrame(np.concatenate([X, y], axis=1), columns=x_names + y_names)
    return frame, y_names


def _check_expansion(members: list, path: str) -> None:
    """Bound decompression by the bytes it would produce, declared in the zip directory, before any is
    produced (``zipfile`` never returns more than a member declares)."""
    produced = sum(info.file_size for info in members)
    packed = max(1, sum(info.compress_size for info in members))
    if produced > MAX_BYTES or (produced > BOMB_FLOOR and produced > MAX_EXPANSION * packed):
        limit = _size(MAX_BYTES) if produced > MAX_BYTES else f"{MAX_EXPANSION}x past {_size(BOMB_FLOOR)}"
        raise NnfitError(
            f"{path} expands from {_size(packed)} to {_size(produced)} of arrays ({produced / packed:,.0f}x); "
            f"nnfit decompresses at most {limit}, as more is a sign of a decompression bomb; "
            "save real data with numpy.savez (uncompressed) or use a smaller sample"
        )


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> np.ndarray:
    """One .npy member: its header checked (a numeric dtype, a size within what the member declares)
    before the data, which is read in exactly that many bytes."""
    with archive.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise NnfitError(f"{what} is not a plain .npy array (format {version}); save it with numpy.savez")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
            else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fp)
        if dtype.hasobject:
            raise NnfitError(f"{what} holds Python objects (dtype object), which would need pickle to load; "
                             "nnfit never loads pickles; save an array of numbers instead")
        if dtype.kind not in "biuf":
            raise NnfitError(f"{what} holds values of type {dtype}; nnfit needs an array of real numbers")
        if len(shape) not in (1, 2):
            raise NnfitError(f"{what} has shape {shape}; it must be 1-D or 2-D with one row per sample")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise NnfitError(f"{what} claims shape {shape} ({_size(nbytes)}), more than the "
                             f"{_size(info.file_size)} the archive holds for it; the file is damaged")
        data = fp.read(nbytes)
    if len(data) != nbytes:
        raise NnfitError(f"{what} is truncated: {_size(len(data))} of {_size(nbytes)}; the file is damaged")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _check_dtype(array: np.ndarray, what: str) -> None:
    if array.dtype.kind not in "biuf":
        raise NnfitError(
            f"{what} holds values of type {array.dtype}; nnfit needs an array of real numbers"
        )


def _check_duplicates(names: list[str], name: str) -> None:
    _check_width(len(names), name)
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise NnfitError(
            f"{name} has repeated column names: {', '.join(repeated)}; "
            "give each column a unique name"
        )


def _select_columns(frame, name, target, inputs, default_target):
    """Resolve the target and input names and convert those columns to float64.

    Returns the target names, the input names and a dict from name to values.
    """
    columns = list(frame.columns)
    if target is None and default_target is None:
        raise NnfitError(f"no target given: pass {S('target', 'NAME')}; columns are: {_listing(columns)}")
    if target is None:
        target_names = default_target
    else:
        target_names = _parse_names(target, "target", "target", columns, name)
    numbers = {}
    if inputs is not None:
        input_names = _parse_names(inputs, "input", "inputs", columns, name)
        targets = set(target_names)
        both = [n for n in input_names if n in targets]
        if both:
            raise NnfitError(
                f"column {both[0]!r} is both a target and an input; "
                "a column can only be one of them"
            )
    else:
        input_names, skipped, targets = [], [], set(target_names)
        for column in columns:
            if column in targets:
                continue
            values, bad = _as_numbers(frame[column])
            # A column without a single number (text, all empty) is not data to fit.
            if np.isnan(values).all():
                skipped.append(column)
                continue
            _require_numbers(frame[column], bad, name)
            input_names.append(column)
            numbers[column] = values
        if skipped:
            warnings.warn(
                f"skipping column(s) without numbers in {name}: {_listing(skipped)}; "
                f"pass {S('inputs')} to choose input columns",
                NnfitWarning,
                stacklevel=3,
            )
        if not input_names:
            raise NnfitError(
                f"no input columns left in {name}: besides the target {_listing(target_names)} "
                f"there is no numeric column; columns are: {_listing(columns)}"
            )
    for column in (*target_names, *input_names):
        if column not in numbers:
            numbers[column], bad = _as_numbers(frame[column])
            _require_numbers(frame[column], bad, name)
    return tuple(target_names), tuple(input_names), numbers


def _parse_names(spec, what: str, key: str, columns: list[str], name: str) -> list[str]:
    """Turn a target or inputs argument into a list of existing column names."""
    flag = S(key)
    if isinstance(spec, str):
        # A whole name wins over splitting, so a column named "a,b" can still be chosen.
        names = [spec] if spec in columns else [n.strip() for n in spec.split(",") if n.strip()]
    elif isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec):
        names = list(spec)
    else:
        raise NnfitError(
            f"{flag} must be a column name, comma-separated names or a list of names, not {spec!r}"
        )
    if not names:
        raise NnfitError(
            f"no {what} column named; pass {flag} with names from: {_listing(columns)}"
        )
    counts, present = Counter(names), set(columns)
    for n in names:
        if counts[n] > 1:
            raise NnfitError(f"{flag} names column {n!r} more than once; name each column once")
        if n not in present:
            message = f"{what} column {n!r} not found in {name}; columns are: {_listing(columns)}."
            lowered = {c.lower(): c for c in columns}
            match = difflib.get_close_matches(n.lower(), list(lowered), n=1)
            if match:
                fixed = ",".join(lowered[match[0]] if m == n else m for m in names)
                message += f" Pass {S(key, fixed)}."
            elif len(columns) == 1 and any(sep in columns[0] for sep in ";\t,|"):
                message += " There is only one column: is the file separated by another character?"
            raise NnfitError(message)
    return names


def _as_numbers(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Return the column as float64 (empty cells NaN) and the positions of non-numbers."""
    kind = column.dtype.kind
    if kind in "biuf":
        return column.to_numpy(dtype="float64", na_value=np.nan), np.array([], dtype=int)
    values = np.full(len(column), np.nan)
    # Text and mixed objects are parsed cell by cell; dates and other types are no numbers.
    if kind in "OSU":
        try:
            parsed = pd.to_numeric(column, errors="coerce")
            values = parsed.to_numpy(dtype="float64", na_value=np.nan)
        except (TypeError, ValueError):
            pass
    return values, np.flatnonzero(np.isnan(values) & column.notna().to_numpy())


def _require_numbers(column: pd.Series, bad: np.ndarray, name: str) -> None:
    if len(bad):
        shown = ", ".join(f"{i + 1} ({_short(column.iloc[i])})" for i in bad[:_MAX_SHOWN])
        more = f" and {len(bad) - _MAX_SHOWN} more" if len(bad) > _MAX_SHOWN else ""
        raise NnfitError(
            f"column {column.name!r} in {name} has non-numeric values at rows {shown}{more}; "
            "fix or remove them (rows count from 1 after the header)"
        )


def _check_values(numbers, name, input_names, target_names, warn_constant=True):
    """Stack the columns into X and Y, requiring every value to be a finite number."""
    X = np.column_stack([numbers[c] for c in input_names])
    Y = np.column_stack([numbers[c] for c in target_names])
    nonfinite = np.concatenate([~np.isfinite(Y), ~np.isfinite(X)], axis=1)
    rows, cols = np.nonzero(nonfinite)
    if len(rows):
        names = (*target_names, *input_names)
        shown = ", ".join(
            f"row {r + 1} column {names[c]!r} ({numbers[names[c]][r]})"
            for r, c in zip(rows[:_MAX_SHOWN], cols[:_MAX_SHOWN])
        )
        more = f" and {len(rows) - _MAX_SHOWN} more" if len(rows) > _MAX_SHOWN else ""
        raise NnfitError(
            f"{name} has missing or non-finite values at {shown}{more}; drop or fill those rows"
        )
    for j, column in enumerate(target_names if warn_constant else ()):
        if len(Y) > 1 and np.all(Y[:, j] == Y[0, j]):
            warnings.warn(
                f"target column {column!r} in {name} is constant (every value is {Y[0, j]:g}); "
                "the fit will be trivial",
                NnfitWarning,
                stacklevel=3,
            )
    return X, Y


def _listing(names) -> str:
    names = list(names)
    if len(names) > 20:
        return ", ".join(names[:20]) + f", ... ({len(names)} in all)"
    return ", ".join(names)


def _short(value) -> str:
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1024:
            return f"{round(n, 1):g} {unit}"
        n /= 1024
    return f"{n:.1f} GB".replace(".0 GB", " GB")


def read_inputs(source, input_names, allowed_extra=()) -> pd.DataFrame:
    """Read the input columns for prediction, checked against the names a model was trained on.

    Columns in ``allowed_extra`` (the model's targets, say) may be present and are returned
    untouched; any other extra or missing column is an error that names it.
    """
    if isinstance(source, pd.DataFrame):
        name, frame = "the DataFrame", source.set_axis([str(c) for c in source.columns], axis=1)
    else:
        name = os.fspath(source)
        frame, default = _read_file(name)
        if default is not None:  # .npy/.npz: named x1..xd and y; keep only the inputs' count
            frame = frame[[c for c in frame.columns if c not in default]]
            if len(frame.columns) == len(input_names):
                frame = frame.set_axis(list(input_names), axis=1)
    _check_duplicates(list(frame.columns), name)
    have, known = set(frame.columns), {*input_names, *allowed_extra}
    missing = [c for c in input_names if c not in have]
    extra = [c for c in frame.columns if c not in known]
    if missing or extra:
        parts = ([f"missing input column(s) {_listing(missing)}"] if missing else []) + (
            [f"unexpected column(s) {_listing(extra)}"] if extra else [])
        raise NnfitError(f"{name} has {' and '.join(parts)}; the model was trained on inputs "
                         f"{_listing(input_names)}")
    if len(frame) == 0:
        raise NnfitError(f"{name} has no rows; give at least one row of inputs")
    numbers = {}
    for column in input_names:
        numbers[column], bad = _as_numbers(frame[column])
        _require_numbers(frame[column], bad, name)
    X, _ = _check_values({**numbers, "": np.zeros(len(frame))}, name, tuple(input_names), ("",),
                         warn_constant=False)
    out = frame.copy()
    out[list(input_names)] = X
    return out
