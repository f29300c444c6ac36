import os
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnfit import tables
from nnfit.errors import NnfitError, NnfitWarning
from nnfit.tables import Table, load_table


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def csv(tmp_path):
    return write(tmp_path, "data.csv", "a,b,y\n1,2,3\n4,5,6\n7,8,10\n")


# --- formats that load -------------------------------------------------------


def test_csv_default_inputs_are_the_other_columns(csv):
    table = load_table(csv, target="y")
    assert isinstance(table, Table)
    assert table.input_names == ("a", "b")
    assert table.target_names == ("y",)
    assert table.X.dtype == np.float64 and table.Y.dtype == np.float64
    np.testing.assert_array_equal(table.X, [[1, 2], [4, 5], [7, 8]])
    np.testing.assert_array_equal(table.Y, [[3], [6], [10]])
    assert table.source == str(csv)


def test_explicit_inputs_subset(csv):
    table = load_table(csv, target="y", inputs="b")
    assert table.input_names == ("b",)
    np.testing.assert_array_equal(table.X, [[2], [5], [8]])


def test_inputs_as_list_and_whitespace(tmp_path):
    path = write(tmp_path, "d.csv", "a, b ,y\n1, 2,3\n4,5 ,6\n")
    table = load_table(path, target=["y"], inputs=["b", "a"])
    assert table.input_names == ("b", "a")
    np.testing.assert_array_equal(table.X, [[2, 1], [5, 4]])


def test_multiple_targets(tmp_path):
    path = write(tmp_path, "d.csv", "x,y1,y2\n1,2,3\n4,5,6\n")
    table = load_table(path, target="y1,y2")
    assert table.target_names == ("y1", "y2")
    assert table.input_names == ("x",)
    assert table.Y.shape == (2, 2)
    np.testing.assert_array_equal(table.Y, [[2, 3], [5, 6]])


def test_tsv_and_tab(tmp_path):
    for name in ("d.tsv", "d.TAB"):
        table = load_table(write(tmp_path, name, "x\ty\n1\t2\n3\t4\n"), target="y")
        np.testing.assert_array_equal(table.X, [[1], [3]])
        np.testing.assert_array_equal(table.Y, [[2], [4]])


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "flag": [True, False, True], "y": [1, 2, 3]})
    frame.to_parquet(path)
    table = load_table(path, target="y")
    assert table.input_names == ("x", "flag")
    np.testing.assert_array_equal(table.X, [[1, 1], [2, 0], [3, 1]])
    np.testing.assert_array_equal(table.Y, [[1], [2], [3]])


def test_npy_last_column_is_target(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.arange(12).reshape(4, 3))
    table = load_table(path)
    assert table.input_names == ("x1", "x2")
    assert table.target_names == ("y",)
    np.testing.assert_array_equal(table.Y[:, 0], [2, 5, 8, 11])
    chosen = load_table(path, target="x1", inputs="x2")
    np.testing.assert_array_equal(chosen.Y[:, 0], [0, 3, 6, 9])


def test_npz_one_d_y(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.arange(3.0), y=np.array([1.0, 2.0, 4.0]))
    table = load_table(path)
    assert table.input_names == ("x1",)
    assert table.target_names == ("y",)
    assert table.X.shape == (3, 1) and table.Y.shape == (3, 1)


def test_npz_two_d_y(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.ones((4, 2)), y=np.arange(8.0).reshape(4, 2))
    table = load_table(path)
    assert table.input_names == ("x1", "x2")
    assert table.target_names == ("y1", "y2")
    assert table.Y.shape == (4, 2)


def test_dataframe_source():
    frame = pd.DataFrame({"x": [1, 2, 3], "name": ["a", "b", "c"], "y": [0.5, 1.5, 2.0]})
    with pytest.warns(NnfitWarning, match="name"):
        table = load_table(frame, target="y")
    assert table.input_names == ("x",)
    assert table.source == "the DataFrame"


def test_dataframe_bad_values_name_the_dataframe():
    with pytest.raises(NnfitError, match="the DataFrame has missing or non-finite"):
        load_table(pd.DataFrame({"x": [1, None, 3], "y": [1, 2, 3]}), target="y")


def test_dates_are_not_numbers():
    frame = pd.DataFrame({"t": pd.date_range("2020", periods=3), "x": [1, 2, 3], "y": [1, 2, 4]})
    with pytest.warns(NnfitWarning, match="skipping column.* t;"):
        assert load_table(frame, target="y").input_names == ("x",)
    with pytest.raises(NnfitError, match="column 't' .*non-numeric"):
        load_table(frame, target="y", inputs="t,x")


def test_non_numeric_column_dropped_with_warning(tmp_path):
    path = write(tmp_path, "d.csv", "x,city,y\n1,Oslo,2\n3,Rome,4\n")
    with pytest.warns(NnfitWarning, match="city"):
        table = load_table(path, target="y")
    assert table.input_names == ("x",)


def test_booleans_are_numbers(tmp_path):
    path = write(tmp_path, "d.csv", "x,b,y\n1,True,2\n3,False,4\n")
    np.testing.assert_array_equal(load_table(path, target="y").X, [[1, 1], [3, 0]])


def test_no_warnings_on_clean_data(csv):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_table(csv, target="y")


# --- bad input ---------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(NnfitError, match="file not found"):
        load_table(tmp_path / "nope.csv", target="y")


def test_directory(tmp_path):
    with pytest.raises(NnfitError, match="is a directory"):
        load_table(tmp_path, target="y")


def test_not_a_path():
    with pytest.raises(NnfitError, match="file path or a pandas DataFrame"):
        load_table(42, target="y")


def test_no_permission(csv, monkeypatch):
    if os.geteuid() == 0:  # root reads anything, so make the read itself fail
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tables.pd, "read_csv", denied)
    else:
        csv.chmod(0)
    try:
        with pytest.raises(NnfitError, match="no permission to read"):
            load_table(csv, target="y")
    finally:
        csv.chmod(0o644)


def test_unsupported_suffix(tmp_path):
    path = write(tmp_path, "d.xlsx", "x")
    with pytest.raises(NnfitError, match=r"'\.xlsx'.*supported suffixes are .csv"):
        load_table(path, target="y")


def test_binary_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,b\n\x00\x01\x02\xff\n")
    with pytest.raises(NnfitError, match="looks like a binary file"):
        load_table(path, target="b")


def test_not_utf8_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"x,y\n1,\xff\xfe\n")
    with pytest.raises(NnfitError, match="not UTF-8"):
        load_table(path, target="y")


def test_ragged_rows(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n1,2\n3,4,5\n")
    with pytest.raises(NnfitError, match="could not read .* as CSV: .*line 3"):
        load_table(path, target="y")


def test_extra_fields_in_every_row(tmp_path):
    # pandas would silently use the first field as the index
    path = write(tmp_path, "d.csv", "x,y\n1,2,3\n4,5,6\n")
    with pytest.raises(NnfitError, match="first data row has more fields than the 2 in the header"):
        load_table(path, target="y")


def test_empty_file(tmp_path):
    with pytest.raises(NnfitError, match="is empty"):
        load_table(write(tmp_path, "d.csv", ""), target="y")
    with pytest.raises(NnfitError, match="is empty"):
        load_table(write(tmp_path, "e.csv", "\n\n"), target="y")


def test_header_only(tmp_path):
    with pytest.raises(NnfitError, match="has 0 rows; at least 2 are needed"):
        load_table(write(tmp_path, "d.csv", "x,y\n"), target="y")


def test_one_row(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n1,2\n")
    with pytest.raises(NnfitError, match="has 1 rows; at least 2 are needed"):
        load_table(path, target="y")
    assert load_table(path, target="y", min_rows=1).X.shape == (1, 1)


def test_no_target_lists_columns(csv):
    expected = "no target given: pass target=NAME; columns are: a, b, y$"
    with pytest.raises(NnfitError, match=expected):
        load_table(csv)


def test_missing_target_lists_columns_and_suggests(tmp_path):
    path = write(tmp_path, "data.csv", "x,y\n1,2\n3,4\n")
    expected = r"target column 'yy' not found in .*data.csv; columns are: x, y\. Pass target='y'\."
    with pytest.raises(NnfitError, match=expected):
        load_table(path, target="yy")
    with pytest.raises(NnfitError, match=r"Pass target='x,y'\."):
        load_table(path, target="X,y")


def test_missing_input(csv):
    with pytest.raises(NnfitError, match="input column 'c' not found .*columns are: a, b, y"):
        load_table(csv, target="y", inputs="a,c")


def test_target_also_input(csv):
    with pytest.raises(NnfitError, match="'a' is both a target and an input"):
        load_table(csv, target="y,a", inputs="a,b")


def test_duplicate_columns(tmp_path):
    path = write(tmp_path, "d.csv", "x,x,y\n1,2,3\n4,5,6\n")
    with pytest.raises(NnfitError, match="repeated column names: x"):
        load_table(path, target="y")


def test_duplicate_columns_dataframe():
    frame = pd.DataFrame([[1, 2, 3], [4, 5, 6]], columns=["x", "x", "y"])
    with pytest.raises(NnfitError, match="repeated column names: x"):
        load_table(frame, target="y")


def test_non_numeric_cells_name_column_and_rows(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n1,2\n2,3\nabc,4\n4,5\n5,6\n6,7\n--,8\n")
    expected = r"column 'x' .*non-numeric values at rows 3 \('abc'\), 7 \('--'\); fix or remove"
    with pytest.raises(NnfitError, match=expected):
        load_table(path, target="y")


def test_non_numeric_target_explicit(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n1,a\n2,b\n")
    with pytest.raises(NnfitError, match="column 'y' .*non-numeric values at rows 1 \\('a'\\), 2"):
        load_table(path, target="y")


def test_text_column_chosen_as_input_is_an_error(tmp_path):
    path = write(tmp_path, "d.csv", "x,city,y\n1,Oslo,2\n3,Rome,4\n")
    with pytest.raises(NnfitError, match="column 'city' .*non-numeric"):
        load_table(path, target="y", inputs="x,city")


def test_nan(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n1,2\n2,3\n3,4\n4,\n")
    with pytest.raises(NnfitError, match=r"non-finite values at row 4 column 'y' \(nan\)"):
        load_table(path, target="y")


def test_inf(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n1,2\ninf,3\n")
    with pytest.raises(NnfitError, match=r"row 2 column 'x' \(inf\).*drop or fill"):
        load_table(path, target="y")


def test_many_bad_values_shows_five(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n" + "1,\n" * 8)
    with pytest.raises(NnfitError, match="row 5 column 'y' \\(nan\\) and 3 more"):
        load_table(path, target="y")


def test_npy_three_d(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((2, 3, 4)))
    with pytest.raises(NnfitError, match=r"3-D array of shape \(2, 3, 4\)"):
        load_table(path)


def test_npy_one_d(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros(5))
    with pytest.raises(NnfitError, match=r"1-D array of shape \(5,\).*needs a 2-D array"):
        load_table(path)


def test_npy_one_column_has_no_inputs(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((5, 1)))
    with pytest.raises(NnfitError, match="no input columns left"):
        load_table(path)


def test_npy_object_array(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.array([[1, "a"], [2, "b"]], dtype=object), allow_pickle=True)
    with pytest.raises(NnfitError, match="Python objects .*never loads pickles"):
        load_table(path)


def test_npy_strings(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.array([["1", "a"], ["2", "b"]]))
    with pytest.raises(NnfitError, match="needs an array of real numbers"):
        load_table(path)


def test_npy_garbage(tmp_path):
    path = tmp_path / "d.npy"
    path.write_bytes(b"hello")
    with pytest.raises(NnfitError, match="does not start with the .npy header"):
        load_table(path)


def test_npz_missing_x_lists_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(NnfitError, match="has no array 'X'; it holds: inputs, y"):
        load_table(path)


def test_npz_object_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.array([1, "a"], dtype=object), y=np.zeros(2))
    with pytest.raises(NnfitError, match="Python objects"):
        load_table(path)


def test_npz_three_d_x(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((2, 2, 2)), y=np.zeros(2))
    with pytest.raises(NnfitError, match=r"array 'X' .*shape \(2, 2, 2\); it must be 1-D or 2-D"):
        load_table(path)


def test_npz_length_mismatch(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(NnfitError, match=r"X has 5 rows but y has 4 \(shapes \(5, 2\) and \(4,\)"):
        load_table(path)


def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "d.npz"
    np.save(path.with_suffix(".npy"), np.zeros((2, 2)))
    path.write_bytes(path.with_suffix(".npy").read_bytes())
    with pytest.raises(NnfitError, match="not a zip archive"):
        load_table(path)


def test_parquet_nested_column(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0], "pts": [[1, 2], [3]], "y": [1.0, 2.0]}), path)
    with pytest.raises(NnfitError, match="column 'pts' .*nested type"):
        load_table(path, target="y")


def test_parquet_corrupt(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(NnfitError, match="could not read .* as Parquet"):
        load_table(path, target="y")


def test_huge_file(csv, monkeypatch):
    monkeypatch.setattr(tables, "MAX_BYTES", 10)
    with pytest.raises(NnfitError, match="nnfit reads tables up to 10 bytes into memory"):
        load_table(csv, target="y")


def test_size_message_in_gb():
    assert tables._size(5 * 1024**3) == "5 GB"
    assert tables._size(4 * 1024**3) == "4 GB"


def test_no_inputs_left(tmp_path):
    path = write(tmp_path, "d.csv", "y\n1\n2\n")
    with pytest.raises(NnfitError, match="no input columns left"):
        load_table(path, target="y")


def test_constant_target_warns(tmp_path):
    path = write(tmp_path, "d.csv", "x,y\n1,3\n2,3\n3,3\n")
    with pytest.warns(NnfitWarning, match="'y' .*is constant"):
        table = load_table(path, target="y")
    assert table.Y.shape == (3, 1)


def test_bad_target_type(csv):
    with pytest.raises(NnfitError, match="target must be a column name"):
        load_table(csv, target=3)


# --- anything at all either loads or raises NnfitError ------------------------


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(max_size=300),
    suffix=st.sampled_from([".csv", ".tsv", ".npy", ".npz", ".parquet"]),
    target=st.sampled_from(["y", None]),
)
def test_arbitrary_bytes_load_or_raise_nnfit_error(tmp_path, data, suffix, target):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NnfitWarning)
        try:
            table = load_table(path, target=target)
        except NnfitError:
            return
    assert table.X.ndim == 2 and table.Y.ndim == 2
    assert np.isfinite(table.X).all() and np.isfinite(table.Y).all()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(alphabet=st.sampled_from("xy,\t\n1.e-+ \"ab"), max_size=80),
    suffix=st.sampled_from([".csv", ".tsv"]),
)
def test_arbitrary_text_tables_load_or_raise_nnfit_error(tmp_path, text, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NnfitWarning)
        try:
            load_table(path, target="y")
        except NnfitError:
            pass
