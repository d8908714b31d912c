"""Tests for annsample.data: file validation, leave-one-out split and tensor builders."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annsample.data import (
    LeaveOneOutSplit,
    SequenceDataset,
    eval_tensors,
    history_csr,
    item_popularity,
    leave_one_out,
    load_dataset,
    pad_rows,
    read_interactions,
    read_sequences,
    training_tensors,
)
from annsample.errors import DataError

BEAUTY = Path(__file__).resolve().parent.parent / "data" / "Beauty.txt"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def make_split(rows: list[list[int]], n_items: int) -> LeaveOneOutSplit:
    """A split built by hand from full sequences, independent of leave_one_out."""
    train = [row[:-2] for row in rows]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in train])]).astype(np.int64)
    return LeaveOneOutSplit(
        n_items=n_items,
        train_indptr=indptr,
        train_items=np.array([i for r in train for i in r], dtype=np.int64),
        valid_target=np.array([r[-2] for r in rows], dtype=np.int64),
        test_target=np.array([r[-1] for r in rows], dtype=np.int64),
        n_dropped=0,
    )


def file_and_line(path: Path, line: int) -> str:
    return re.escape(f"{path}, line {line}:")


# --------------------------------------------------------------------------- Beauty


def test_beauty_loads_with_published_counts_quickly():
    # CPU time, not wall clock: other processes on a shared machine must not fail this test
    start = time.process_time()
    ds = read_sequences(BEAUTY)
    elapsed = time.process_time() - start
    assert (ds.n_users, ds.n_items, len(ds.items)) == (22363, 12101, 198502)
    assert ds.indptr.dtype == ds.items.dtype == np.int64
    assert ds.indptr.shape == (22364,)
    assert ds.lengths.min() == 5 and ds.lengths.max() == 204
    assert ds.sequence(0).tolist() == [1, 2, 3, 4, 5]
    assert ds.item_labels is None and ds.user_labels is None
    # Every id 1..N is used (contiguous ids), so nothing in the catalog is dead.
    assert np.array_equal(np.unique(ds.items), np.arange(1, 12102))
    assert elapsed < 1.0, f"loading Beauty took {elapsed:.2f} s of CPU time"


def test_beauty_split_shapes():
    split = leave_one_out(read_sequences(BEAUTY))
    assert split.n_users == 22363 and split.n_dropped == 0
    assert len(split.train_items) == 198502 - 2 * 22363
    inputs, targets = training_tensors(split)
    assert inputs.shape == targets.shape == (22363, 50)
    # User 1 is "1 1 2 3 4 5": training items 1 2 3.
    assert inputs[0, -2:].tolist() == [1, 2] and targets[0, -2:].tolist() == [2, 3]
    assert not inputs[0, :-2].any()


# --------------------------------------------------------------------------- read_sequences


def test_read_sequences_parses_and_skips_blank_lines(tmp_path):
    # Leading zeros and a 20-character token that still fits in int64 take the slow path.
    path = write(tmp_path, "seq.txt", "\n7 3 1 2\n\n  9\t4 4 \r\n00000000000000000008 0004\n")
    ds = read_sequences(path)
    assert ds.indptr.tolist() == [0, 3, 5, 6]
    assert ds.items.tolist() == [3, 1, 2, 4, 4, 4]
    assert ds.n_items == 4 and ds.n_users == 3 and ds.source == str(path)
    assert ds.lengths.tolist() == [3, 2, 1]
    assert ds.sequence(1).tolist() == [4, 4]
    with pytest.raises(IndexError):
        ds.sequence(3)


def test_read_sequences_warns_about_sparse_ids(tmp_path, caplog):
    path = write(tmp_path, "sparse.txt", "1 1 1000\n")
    with caplog.at_level(logging.WARNING, logger="annsample.data"):
        ds = read_sequences(path)
    assert ds.n_items == 1000
    assert "only 2 of the item ids 1..1000 occur" in caplog.text


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=re.escape(f"{path}: no such file")):
        read_sequences(path)


def test_directory(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: is a directory")):
        read_sequences(tmp_path)


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, "empty.txt", content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no users found")):
        read_sequences(path)


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ("1 2 3\n2 4 x5\n", 2, "token 'x5' is not an integer"),
        ("1 2 3\n2 4 5.0\n", 2, "token '5.0' is not an integer"),
        ("1 2 3\n\n2 4 1_0\n", 3, "token '1_0' is not an integer"),
        ("1 +2\n", 1, "token '+2' is not an integer"),
        ("1 2\xa03\n", 1, "token '2\\xa03' is not an integer"),
        ("1 2 -3\n", 1, "item id -3 is not positive"),
        ("1 2 0\n", 1, "item id 0 is not positive"),
        ("0 2 3\n", 1, "user id 0 is not positive"),
        ("1 2 3\n2 99999999999999999999\n", 2, "does not fit in int64"),
        ("1 9223372036854775808\n", 1, "does not fit in int64"),
        ("1 2 " + "9" * 5000 + "\n", 1, "does not fit in int64"),
        ("1 2 3\n4\n", 2, "user 4 has no items"),
        ("1 2 3\n2 4\n1 5\n", 3, "user 1 already appeared on line 1"),
        ("1 2\n\x00\x01\x02", 2, "NUL byte found"),
    ],
)
def test_read_sequences_errors_name_file_and_line(tmp_path, content, line, message):
    path = write(tmp_path, "bad.txt", content)
    with pytest.raises(DataError, match=file_and_line(path, line) + ".*" + re.escape(message)):
        read_sequences(path)


def test_not_utf8(tmp_path):
    path = write(tmp_path, "latin1.txt", b"1 2 3\n2 3 \xe9\n")
    with pytest.raises(DataError, match=file_and_line(path, 2) + " not UTF-8 text"):
        read_sequences(path)


def test_error_is_a_value_error(tmp_path):
    path = write(tmp_path, "bad.txt", "1 a\n")
    with pytest.raises(ValueError, match="each line must read"):
        read_sequences(path)


_NEAR_VALID_LINES = st.lists(
    st.lists(st.integers(min_value=0, max_value=40), min_size=2, max_size=6).map(
        lambda ids: " ".join(map(str, ids))
    ),
    max_size=6,
).map(lambda lines: "\n".join(lines).encode())
_SEQUENCE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.sampled_from([b"1", b"2", b"7", b"0", b"-", b" ", b"\t", b"\n", b"\r", b"x", b"\xff"]),
        max_size=60,
    ).map(b"".join),
    _NEAR_VALID_LINES,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=_SEQUENCE_BYTES)
def test_arbitrary_bytes_load_or_raise_data_error(tmp_path, content):
    path = write(tmp_path, "fuzz.txt", content)
    try:
        ds = read_sequences(path)
    except DataError as error:
        assert str(path) in str(error)
        return
    assert ds.n_users >= 1 and len(ds.items) >= ds.n_users
    assert ds.items.dtype == np.int64
    assert ds.items.min() >= 1 and ds.items.max() == ds.n_items
    assert ds.indptr[0] == 0 and ds.indptr[-1] == len(ds.items)
    assert np.all(np.diff(ds.indptr) >= 1)


# --------------------------------------------------------------------------- read_interactions


def test_read_interactions_remaps_ids_and_keeps_tie_order(tmp_path):
    path = write(
        tmp_path,
        "log.csv",
        "item,user,timestamp,rating\n"
        "apple,bob,5,1\n"
        "pear,alice,3,1\n"
        "kiwi,bob,1,1\n"
        "fig,bob,5,1\n"  # same timestamp as apple: must stay after it
        "apple,alice,3.0,1\n"  # same timestamp as pear: must stay after it
        "plum,alice,2e0,1\n",
    )
    ds = read_interactions(path)
    # Users in order of first appearance; rows sorted by (user, time) with file order on ties.
    assert ds.user_labels.tolist() == ["bob", "alice"]
    assert ds.indptr.tolist() == [0, 3, 6]
    names = [ds.item_labels[i] for i in ds.items]
    assert names == ["kiwi", "apple", "fig", "plum", "pear", "apple"]
    # Items numbered 1..N in first appearance of that sorted order.
    assert ds.item_labels.tolist() == ["", "kiwi", "apple", "fig", "plum", "pear"]
    assert ds.items.tolist() == [1, 2, 3, 4, 5, 2]
    assert ds.n_items == 5 and ds.items.dtype == np.int64


def test_read_interactions_tab_sniffing_and_custom_columns(tmp_path):
    path = write(tmp_path, "log.tsv", "uid\tiid\tts\nu1\ti1\t2\nu1\ti2\t1\n")
    ds = read_interactions(path, user_col="uid", item_col="iid", time_col="ts")
    assert ds.item_labels.tolist() == ["", "i2", "i1"]
    assert ds.items.tolist() == [1, 2]


def test_read_interactions_without_time_keeps_file_order(tmp_path):
    path = write(tmp_path, "log.csv", "user,item\nb,3\na,1\nb,2\n")
    ds = read_interactions(path, time_col=None)
    assert ds.user_labels.tolist() == ["b", "a"]
    assert [ds.item_labels[i] for i in ds.items] == ["3", "2", "1"]


def test_load_dataset_dispatch(tmp_path):
    seq = write(tmp_path, "seq.txt", "1 2 3\n")
    table = write(tmp_path, "log.CSV", "u,i,t\nx,y,1\n")
    assert load_dataset(seq).item_labels is None
    assert load_dataset(table, user_col="u", item_col="i", time_col="t").n_items == 1
    renamed = write(tmp_path, "log.data", "user,item,timestamp\nx,y,1\n")
    assert load_dataset(renamed, fmt="interactions").user_labels.tolist() == ["x"]
    with pytest.raises(DataError, match="choose one of auto, sequences, interactions"):
        load_dataset(seq, fmt="parquet")
    with pytest.raises(DataError, match="only apply to the interactions format"):
        load_dataset(seq, user_col="u")


def test_missing_column_lists_found_and_expected(tmp_path):
    path = write(tmp_path, "log.csv", "user,product,timestamp\na,b,1\n")
    pattern = (
        file_and_line(path, 1) + r".*item_col='item'.*\['user', 'product', 'timestamp'\].*item_col="
    )
    with pytest.raises(DataError, match=pattern):
        read_interactions(path)


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ("user,item,timestamp\na,b,1\nc,d,yesterday\n", 3, "timestamp 'yesterday'"),
        ("user,item,timestamp\na,b,nan\n", 2, "timestamp 'nan'"),
        ("user,item,timestamp\na,b,1\n ,d,2\n", 3, "empty 'user' field"),
        ("user,item,timestamp\n\na,,1\n", 3, "empty 'item' field"),
        ("user,item,timestamp\na,b\n", 2, "2 fields but the header has 3"),
        ("user,item,timestamp\na,b,1\nc,d\x00,1\n", 3, "NUL byte found"),
        (b"user,item,timestamp\na,b,1\n" + b"\xfe,x,1\n", 3, "not UTF-8 text"),
    ],
)
def test_read_interactions_errors_name_file_and_line(tmp_path, content, line, message):
    path = write(tmp_path, "log.csv", content)
    with pytest.raises(DataError, match=file_and_line(path, line) + ".*" + re.escape(message)):
        read_interactions(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the table is empty"),
        ("\n\n", "the table is empty"),
        ("user,item,timestamp\n", "no rows"),
    ],
)
def test_read_interactions_empty_table(tmp_path, content, message):
    path = write(tmp_path, "log.csv", content)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + ".*" + message):
        read_interactions(path)


def test_read_interactions_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError, match=re.escape(f"{path}: no such file")):
        read_interactions(path)


# --------------------------------------------------------------------------- split


def test_leave_one_out_drops_short_users_with_one_warning(caplog):
    ds = SequenceDataset(
        indptr=np.array([0, 2, 6, 7, 10]),
        items=np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1]),
        n_items=9,
        source="mem.txt",
    )
    with caplog.at_level(logging.WARNING, logger="annsample.data"):
        split = leave_one_out(ds)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropped 2 users with fewer than 3 interactions" in warnings[0].getMessage()
    assert split.n_dropped == 2 and split.n_users == 2
    assert split.train_indptr.tolist() == [0, 2, 3]
    assert split.train_items.tolist() == [3, 4, 8]
    assert split.valid_target.tolist() == [5, 9]
    assert split.test_target.tolist() == [6, 1]


def test_leave_one_out_no_user_left():
    ds = SequenceDataset(np.array([0, 2, 3]), np.array([1, 2, 3]), 3, "short.txt")
    with pytest.raises(DataError, match="short.txt: no user has 3 or more"):
        leave_one_out(ds)


def test_sequence_dataset_rejects_bad_arrays():
    with pytest.raises(DataError, match="item ids must lie in 1..n_items = 2"):
        SequenceDataset(np.array([0, 2]), np.array([1, 3]), 2, "mem")
    with pytest.raises(DataError, match="indptr must start at 0"):
        SequenceDataset(np.array([0, 1]), np.array([1, 2]), 2, "mem")


def test_item_popularity():
    split = make_split([[1, 1, 3, 9, 9], [3, 2, 2]], n_items=4)
    popularity = item_popularity(split)
    assert popularity.dtype == np.int64
    assert popularity.tolist() == [0, 2, 0, 2, 0]


# --------------------------------------------------------------------------- tensors


def test_training_tensors_keeps_last_pairs():
    split = make_split([[5, 6, 7, 8, 1, 2]], n_items=9)
    inputs, targets = training_tensors(split, max_len=3)
    assert inputs.tolist() == [[5, 6, 7]] and targets.tolist() == [[6, 7, 8]]


def test_training_tensors_pads_left_and_handles_single_item():
    split = make_split([[5, 6, 1, 2], [4, 1, 2], [1, 2, 3, 4, 5, 6, 7]], n_items=9)
    inputs, targets = training_tensors(split, max_len=4)
    assert inputs.dtype == targets.dtype == np.int64
    assert inputs.tolist() == [[0, 0, 0, 5], [0, 0, 0, 0], [1, 2, 3, 4]]
    assert targets.tolist() == [[0, 0, 0, 6], [0, 0, 0, 0], [2, 3, 4, 5]]


def test_training_tensors_matches_loop_reference():
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(1, 20, size=n)) for n in rng.integers(3, 15, size=40)]
    split = make_split(rows, n_items=19)
    inputs, targets = training_tensors(split, max_len=6)
    for u, row in enumerate(rows):
        train = row[:-2]
        pairs = list(zip(train[:-1], train[1:], strict=True))[-6:]
        padded = [(0, 0)] * (6 - len(pairs)) + pairs
        assert inputs[u].tolist() == [a for a, _ in padded]
        assert targets[u].tolist() == [b for _, b in padded]


def test_eval_tensors_both_stages():
    split = make_split([[1, 2, 3, 4, 5, 6], [7, 8, 9]], n_items=9)
    inputs, targets = eval_tensors(split, "valid", max_len=3)
    assert inputs.tolist() == [[2, 3, 4], [0, 0, 7]]
    assert targets.tolist() == [5, 8]
    inputs, targets = eval_tensors(split, "test", max_len=3)
    assert inputs.tolist() == [[3, 4, 5], [0, 7, 8]]
    assert targets.tolist() == [6, 9]
    inputs, targets = eval_tensors(split, "test", max_len=1)
    assert inputs.tolist() == [[5], [8]]
    assert inputs.dtype == targets.dtype == np.int64
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        eval_tensors(split, "train")
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        eval_tensors(split, "valid", max_len=0)


def test_history_csr_sorts_and_deduplicates():
    # Training items [4, 2, 4, 1] and [3, 3]; valid targets 2 and 5.
    split = make_split([[4, 2, 4, 1, 2, 9], [3, 3, 5, 3]], n_items=9)
    indptr, items = history_csr(split, "train")
    assert indptr.dtype == items.dtype == np.int64
    assert indptr.tolist() == [0, 3, 4] and items.tolist() == [1, 2, 4, 3]
    valid_indptr, valid_items = history_csr(split, "valid")
    assert np.array_equal(valid_indptr, indptr) and np.array_equal(valid_items, items)
    # "test" adds the valid target: 2 is already seen by user 0 (no repeat), 5 is new for user 1.
    indptr, items = history_csr(split, "test")
    assert indptr.tolist() == [0, 3, 5] and items.tolist() == [1, 2, 4, 3, 5]
    split = make_split([[1, 7, 2]], n_items=9)
    assert history_csr(split, "test")[1].tolist() == [1, 7]
    with pytest.raises(ValueError, match="unknown stage"):
        history_csr(split, "dev")


def test_pad_rows():
    indptr = np.array([0, 2, 2, 5], dtype=np.int64)
    items = np.array([1, 2, 3, 4, 5], dtype=np.int64)
    out = pad_rows(indptr, items, np.array([2, 1, 0, 2]), fill=-1)
    assert out.dtype == np.int64
    assert out.tolist() == [[3, 4, 5], [-1, -1, -1], [1, 2, -1], [3, 4, 5]]
    assert pad_rows(indptr, items, np.array([1]), fill=0).tolist() == [[0]]
    assert pad_rows(indptr, items, np.array([], dtype=np.int64), fill=0).shape == (0, 1)
    with pytest.raises(IndexError):
        pad_rows(indptr, items, np.array([3]), fill=0)
