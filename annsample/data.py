"""Loading sequential-recommendation datasets and building leave-one-out training/eval arrays.

Everything is a flat CSR layout of int64 numpy arrays: ``indptr`` (U+1,) offsets into ``items``,
item ids 1..N, 0 reserved for padding. Files are validated where they enter; every malformed
input raises :class:`~annsample.errors.DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from annsample.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "LeaveOneOutSplit",
    "SequenceDataset",
    "eval_tensors",
    "history_csr",
    "item_popularity",
    "leave_one_out",
    "load_dataset",
    "pad_rows",
    "read_interactions",
    "read_sequences",
    "training_tensors",
]

_INT64_MAX = np.iinfo(np.int64).max
_SEQUENCE_HINT = "each line must read 'user_id item_id item_id ...' with positive integer ids"
# Only ASCII whitespace separates tokens: str.split() would also split on \x1c-\x1f and
# Unicode spaces, silently accepting lines that are not the documented format.
_SEPARATORS = re.compile(r"[ \t\r\f\v]+")
_WELL_FORMED_LINE = re.compile(r"[0-9]+(?:[ \t\r\f\v]+[0-9]+)*")
_SIGNED_INT = re.compile(r"-?[0-9]+")
_FORMATS = ("auto", "sequences", "interactions")
_STAGES = ("train", "valid", "test")


@dataclass(frozen=True, eq=False)
class SequenceDataset:
    """Chronological item sequences of U users in CSR form.

    Attributes:
        indptr: (U+1,) int64, offsets into ``items``; user u's sequence is
            ``items[indptr[u]:indptr[u+1]]``.
        items: (sum of lengths,) int64, item ids in 1..n_items, oldest first within each user.
        n_items: catalog size N; ids run 1..N and 0 is padding.
        source: the file the data came from, used in messages.
        item_labels: (N+1,) str array mapping each new item id to its original id (row 0 is ""),
            or None when ids were used as they are (sequence format).
        user_labels: (U,) str array of original user ids, or None (sequence format).

    Example:
        >>> ds = SequenceDataset(np.array([0, 2, 5]), np.array([3, 1, 2, 2, 4]), 4, "mem")
        >>> ds.n_users, ds.lengths.tolist(), ds.sequence(1).tolist()
        (2, [2, 3], [2, 2, 4])
    """

    indptr: np.ndarray
    items: np.ndarray
    n_items: int
    source: str
    item_labels: np.ndarray | None = None
    user_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_csr(self.indptr, self.items, self.n_items, f"{self.source}: dataset")
        if self.item_labels is not None and len(self.item_labels) != self.n_items + 1:
            raise DataError(
                f"{self.source}: item_labels has {len(self.item_labels)} rows, "
                f"expected n_items + 1 = {self.n_items + 1}"
            )
        if self.user_labels is not None and len(self.user_labels) != self.n_users:
            raise DataError(
                f"{self.source}: user_labels has {len(self.user_labels)} rows, "
                f"expected n_users = {self.n_users}"
            )

    @property
    def n_users(self) -> int:
        """Number of users U."""
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(U,) int64 sequence length of each user."""
        return np.diff(self.indptr)

    def sequence(self, u: int) -> np.ndarray:
        """Item ids of user ``u``, oldest first: a (length,) int64 view into ``items``."""
        if not 0 <= u < self.n_users:
            raise IndexError(f"user {u} out of range for {self.n_users} users")
        return self.items[self.indptr[u] : self.indptr[u + 1]]


@dataclass(frozen=True, eq=False)
class LeaveOneOutSplit:
    """Leave-one-out split of the users that have at least 3 items.

    Attributes:
        n_items: catalog size N (ids 1..N, 0 is padding).
        train_indptr: (U+1,) int64 CSR offsets into ``train_items``.
        train_items: (sum of lengths - 2U,) int64, each kept user's ``sequence[:-2]``.
        valid_target: (U,) int64, each kept user's ``sequence[-2]``.
        test_target: (U,) int64, each kept user's ``sequence[-1]``.
        n_dropped: users dropped because they had fewer than 3 items.
    """

    n_items: int
    train_indptr: np.ndarray
    train_items: np.ndarray
    valid_target: np.ndarray
    test_target: np.ndarray
    n_dropped: int

    @property
    def n_users(self) -> int:
        """Number of kept users U."""
        return len(self.train_indptr) - 1


# --------------------------------------------------------------------------- reading files


def read_sequences(path: str | Path) -> SequenceDataset:
    """Read a ``user_id item item ...`` file (one user per line, items oldest first).

    Item ids are used as they are, so ``n_items`` is the largest id; users keep file order and
    their ids need not be contiguous. Blank lines are skipped. The whole file is parsed before any
    array is built, so a bad line never leaves a half-loaded dataset.

    Returns:
        A :class:`SequenceDataset` with int64 ``indptr`` (U+1,) and ``items``, and no labels.

    Raises:
        DataError: the file is missing, a directory, binary or not UTF-8, empty, or a line has a
            non-integer token, a zero/negative/out-of-range id, no items, or a repeated user id.
    """
    source = str(path)
    text = _read_text(path)
    sequences: list[list[int]] = []
    first_line_of_user: dict[int, int] = {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.strip(" \t\r\f\v")
        if not line:
            continue
        tokens = _SEPARATORS.split(line)
        # Fast path for plain digit tokens short enough (<= 18 digits) to fit in int64; anything
        # else, zero included, goes through the token-by-token check that explains the problem.
        if _WELL_FORMED_LINE.fullmatch(line) is not None and max(map(len, tokens)) <= 18:
            ids = [int(token) for token in tokens]
            if min(ids) == 0:
                ids = _parse_ids(source, line_no, tokens)
        else:
            ids = _parse_ids(source, line_no, tokens)
        user, *items = ids
        if not items:
            raise DataError(
                f"{source}, line {line_no}: user {user} has no items; {_SEQUENCE_HINT} "
                "(remove the line or add the user's items)"
            )
        if user in first_line_of_user:
            raise DataError(
                f"{source}, line {line_no}: user {user} already appeared on line "
                f"{first_line_of_user[user]}; merge the two lines into one chronological sequence"
            )
        first_line_of_user[user] = line_no
        sequences.append(items)
    if not sequences:
        raise DataError(f"{source}: no users found (the file is empty); {_SEQUENCE_HINT}")

    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    indptr = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    items = np.fromiter(
        itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(indptr[-1])
    )
    n_items = int(items.max())
    n_distinct = len(np.unique(items))
    if n_distinct < n_items // 2:
        logger.warning(
            "%s: only %d of the item ids 1..%d occur; ids are used as they are, so embedding "
            "tables get %d rows (use read_interactions to remap ids to 1..N)",
            source,
            n_distinct,
            n_items,
            n_items + 1,
        )
    logger.info(
        "loaded %s: %d users, %d items, %d interactions",
        source,
        len(sequences),
        n_items,
        len(items),
    )
    return SequenceDataset(indptr=indptr, items=items, n_items=n_items, source=source)


def read_interactions(
    path: str | Path,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    sep: str | None = None,
) -> SequenceDataset:
    """Read a CSV/TSV table of (user, item, timestamp) rows with a header row.

    Ids may be any strings; they are remapped to contiguous ints. Users get 0..U-1 in order of
    first appearance in the file. Rows are sorted by (user, timestamp) with a stable sort, so rows
    with equal timestamps keep file order; items then get 1..N in order of first appearance in
    that sorted order. ``time_col=None`` keeps file order within each user.

    Args:
        sep: field separator; None sniffs it from the header (tab if it has one, else comma).

    Returns:
        A :class:`SequenceDataset` with ``item_labels`` (N+1,) and ``user_labels`` (U,) str
        arrays giving the original ids.

    Raises:
        DataError: the file is missing, binary or not UTF-8, has no rows, lacks a column, or a row
            has the wrong number of fields, an empty user/item, or an unparsable timestamp.
    """
    source = str(path)
    text = _read_text(path)
    if sep is None:
        first_line = next((line for line in text.split("\n") if line.strip()), "")
        sep = "\t" if "\t" in first_line else ","
    if not isinstance(sep, str) or len(sep) != 1 or sep in '\r\n"':
        raise DataError(
            f"{source}: sep must be one character other than a quote or newline, got {sep!r}"
        )
    expected = ", ".join(repr(name) for name in (user_col, item_col, time_col) if name is not None)

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    header: list[str] | None = None
    try:
        for row in reader:
            line_no = reader.line_num
            if not any(field.strip() for field in row):
                continue
            if header is None:
                header = [name.strip() for name in row]
                user_at, item_at, time_at = _column_positions(
                    source, line_no, header, user_col, item_col, time_col
                )
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{source}, line {line_no}: {len(row)} fields but the header has "
                    f"{len(header)}; check the separator (sep={sep!r}) and quoting"
                )
            user, item = row[user_at].strip(), row[item_at].strip()
            for name, value in ((user_col, user), (item_col, item)):
                if not value:
                    raise DataError(
                        f"{source}, line {line_no}: empty {name!r} field; "
                        "fill it in or remove the row"
                    )
            users.append(user)
            items.append(item)
            if time_at is not None:
                times.append(_parse_time(source, line_no, time_col, row[time_at]))
    except csv.Error as error:
        raise DataError(
            f"{source}, line {reader.line_num}: cannot parse the row ({error}); "
            "check the separator and quoting"
        ) from error
    if header is None:
        raise DataError(
            f"{source}: the table is empty; expected a header row naming the columns {expected}"
        )
    if not users:
        raise DataError(f"{source}: the table has a header but no rows; add interaction rows")

    user_labels, user_codes = _codes_by_first_appearance(np.array(users))
    if time_at is not None:
        # lexsort is stable: rows with equal (user, timestamp) keep file order.
        order = np.lexsort((np.array(times, dtype=np.float64), user_codes))
    else:
        order = np.argsort(user_codes, kind="stable")
    item_labels, item_codes = _codes_by_first_appearance(np.array(items)[order])
    counts = np.bincount(user_codes, minlength=len(user_labels))
    indptr = np.zeros(len(user_labels) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    item_labels = np.concatenate([np.array([""], dtype=item_labels.dtype), item_labels])
    logger.info(
        "loaded %s: %d users, %d items, %d interactions",
        source,
        len(user_labels),
        len(item_labels) - 1,
        len(item_codes),
    )
    return SequenceDataset(
        indptr=indptr,
        items=item_codes + 1,
        n_items=len(item_labels) - 1,
        source=source,
        item_labels=item_labels,
        user_labels=user_labels,
    )


def load_dataset(path: str | Path, fmt: str = "auto", **interaction_kwargs) -> SequenceDataset:
    """Load a dataset as sequences or interactions.

    ``fmt="auto"`` reads ``.csv``/``.tsv`` files with :func:`read_interactions` and anything else
    with :func:`read_sequences`; ``interaction_kwargs`` go to :func:`read_interactions`.
    """
    if fmt not in _FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; choose one of {', '.join(_FORMATS)}")
    if fmt == "auto":
        is_table = Path(path).suffix.lower() in (".csv", ".tsv")
        fmt = "interactions" if is_table else "sequences"
    if fmt == "interactions":
        return read_interactions(path, **interaction_kwargs)
    if interaction_kwargs:
        raise DataError(
            f"{path}: options {sorted(interaction_kwargs)} only apply to the interactions format; "
            "drop them or pass fmt='interactions'"
        )
    return read_sequences(path)


# --------------------------------------------------------------------------- split and tensors


def leave_one_out(dataset: SequenceDataset) -> LeaveOneOutSplit:
    """Split each user's sequence into ``[:-2]`` training items, ``[-2]`` valid and ``[-1]`` test.

    Users with fewer than 3 items are dropped, with one warning counting them.

    Raises:
        DataError: no user has 3 or more items.
    """
    lengths = dataset.lengths
    kept = lengths >= 3
    n_dropped = int(np.count_nonzero(~kept))
    if n_dropped:
        logger.warning(
            "%s: dropped %d users with fewer than 3 interactions (leave-one-out needs 3)",
            dataset.source,
            n_dropped,
        )
    if n_dropped == dataset.n_users:
        raise DataError(
            f"{dataset.source}: no user has 3 or more interactions, so leave-one-out leaves "
            "nothing to train or evaluate on; use a dataset with longer sequences"
        )
    ends = dataset.indptr[1:][kept]
    train_lengths = lengths[kept] - 2
    # Per interaction: which user it belongs to and how far from the end of that user's row.
    owner = np.repeat(np.arange(dataset.n_users), lengths)
    from_end = dataset.indptr[1:][owner] - np.arange(len(dataset.items))
    train_mask = kept[owner] & (from_end > 2)
    train_indptr = np.zeros(len(ends) + 1, dtype=np.int64)
    np.cumsum(train_lengths, out=train_indptr[1:])
    return LeaveOneOutSplit(
        n_items=dataset.n_items,
        train_indptr=train_indptr,
        train_items=dataset.items[train_mask],
        valid_target=dataset.items[ends - 2],
        test_target=dataset.items[ends - 1],
        n_dropped=n_dropped,
    )


def item_popularity(split: LeaveOneOutSplit) -> np.ndarray:
    """(N+1,) int64 count of each item among the training items; entry 0 (padding) is 0."""
    return np.bincount(split.train_items, minlength=split.n_items + 1).astype(np.int64)


def training_tensors(split: LeaveOneOutSplit, max_len: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """SASRec next-item training samples, one row per user.

    For training items t_1..t_m the inputs are t_1..t_{m-1} and the targets t_2..t_m; the last
    ``max_len`` pairs are kept, right-aligned, with 0 padding on the left.

    Returns:
        inputs (U, max_len) int64 and targets (U, max_len) int64.

    Example:
        >>> split = LeaveOneOutSplit(9, np.array([0, 4]), np.array([5, 6, 7, 8]),
        ...                          np.array([1]), np.array([2]), 0)
        >>> [a.tolist() for a in training_tensors(split, max_len=3)]
        [[[5, 6, 7]], [[6, 7, 8]]]
    """
    _check_max_len(max_len)
    starts, ends = split.train_indptr[:-1], split.train_indptr[1:]
    # Users with a single training item have no pair: clamp so their rows come out empty.
    inputs = _right_aligned_tail(split.train_items, starts, np.maximum(ends - 1, starts), max_len)
    targets = _right_aligned_tail(split.train_items, np.minimum(starts + 1, ends), ends, max_len)
    return inputs, targets


def eval_tensors(
    split: LeaveOneOutSplit, stage: str, max_len: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and targets for evaluating ``stage`` ("valid" or "test").

    "valid" feeds the last ``max_len`` training items and targets ``valid_target``; "test" feeds
    the last ``max_len`` of (training items + valid target) and targets ``test_target``.

    Returns:
        inputs (U, max_len) int64, right-aligned with 0 padding, and targets (U,) int64.
    """
    _check_max_len(max_len)
    starts, ends = split.train_indptr[:-1], split.train_indptr[1:]
    if stage == "valid":
        inputs = _right_aligned_tail(split.train_items, starts, ends, max_len)
        return inputs, split.valid_target.copy()
    if stage == "test":
        inputs = np.empty((split.n_users, max_len), dtype=np.int64)
        inputs[:, :-1] = _right_aligned_tail(split.train_items, starts, ends, max_len - 1)
        inputs[:, -1] = split.valid_target
        return inputs, split.test_target.copy()
    raise ValueError(f"unknown stage {stage!r}; choose 'valid' or 'test'")


def history_csr(split: LeaveOneOutSplit, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """Items each user saw before the target of ``stage``, as sorted de-duplicated CSR rows.

    "train" and "valid" use the training items; "test" adds the valid target.

    Returns:
        indptr (U+1,) int64 and items int64, each row ascending without repeats.
    """
    if stage not in _STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(_STAGES)}")
    n_users = split.n_users
    rows = np.repeat(np.arange(n_users), np.diff(split.train_indptr))
    items = split.train_items
    if stage == "test":
        rows = np.concatenate([rows, np.arange(n_users)])
        items = np.concatenate([items, split.valid_target])
    order = np.lexsort((items, rows))
    rows, items = rows[order], items[order]
    first = np.ones(len(items), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (items[1:] != items[:-1])
    rows, items = rows[first], items[first]
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
    return indptr, items.astype(np.int64, copy=False)


def pad_rows(indptr: np.ndarray, items: np.ndarray, rows: np.ndarray, fill: int) -> np.ndarray:
    """Gather CSR rows into a dense array right-padded with ``fill``.

    Args:
        indptr: (U+1,) int64 CSR offsets. items: (nnz,) int64 values. rows: (R,) int row indices.

    Returns:
        (R, W) int64 with W = max(1, longest gathered row).

    Example:
        >>> pad_rows(np.array([0, 2, 2, 5]), np.array([1, 2, 3, 4, 5]), np.array([2, 1, 0]), -1)
        array([[ 3,  4,  5],
               [-1, -1, -1],
               [ 1,  2, -1]])
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = len(indptr) - 1
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError(f"rows must lie in [0, {n_rows}); got {rows.min()}..{rows.max()}")
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    width = max(int(lengths.max(initial=0)), 1)
    offsets = np.arange(width)
    mask = offsets < lengths[:, None]  # (R, W)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    out[mask] = items[(starts[:, None] + offsets)[mask]]
    return out


# --------------------------------------------------------------------------- helpers


def _read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, turning every failure into a DataError that names the file."""
    path = Path(path)
    if "\x00" in str(path):
        raise DataError(f"{str(path)!r}: a path cannot contain a NUL byte; check the file name")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a dataset file; pass the file inside it")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from error
    nul = data.find(b"\x00")
    if nul >= 0:
        line_no = data.count(b"\n", 0, nul) + 1
        raise DataError(
            f"{path}, line {line_no}: NUL byte found, so this is a binary file, not a text "
            "dataset; pass the plain-text file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_no = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}, line {line_no}: not UTF-8 text (byte {data[error.start]:#04x}); "
            "re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # byte-order mark written by some editors


def _parse_ids(source: str, line_no: int, tokens: list[str]) -> list[int]:
    """Parse the tokens of one sequence line as positive int64 ids, naming the first bad one."""
    ids = []
    for position, token in enumerate(tokens):
        what = "user id" if position == 0 else "item id"
        if _SIGNED_INT.fullmatch(token) is None:
            raise DataError(
                f"{source}, line {line_no}: token {token!r} is not an integer; {_SEQUENCE_HINT}"
            )
        digits = token.lstrip("-").lstrip("0")
        if token.startswith("-") or not digits:
            raise DataError(
                f"{source}, line {line_no}: {what} {token} is not positive; ids start at 1 "
                "(0 is padding), so shift them by one"
            )
        # Length first: int() refuses strings of over 4300 digits.
        if len(digits) > 19 or int(digits) > _INT64_MAX:
            raise DataError(
                f"{source}, line {line_no}: {what} {token!r} does not fit in int64; "
                "remap ids to 1..N (e.g. with read_interactions)"
            )
        ids.append(int(digits))
    return ids


def _column_positions(
    source: str,
    line_no: int,
    header: list[str],
    user_col: str,
    item_col: str,
    time_col: str | None,
) -> tuple[int, int, int | None]:
    """Positions of the user, item and time columns in ``header``."""
    wanted = {"user_col": user_col, "item_col": item_col}
    if time_col is not None:
        wanted["time_col"] = time_col
    missing = [f"{option}={name!r}" for option, name in wanted.items() if name not in header]
    if missing:
        raise DataError(
            f"{source}, line {line_no}: column(s) {', '.join(missing)} not found; the header has "
            f"{header}; pass the right names with the user_col=, item_col=, time_col= options "
            "(or sep= if the separator was guessed wrong)"
        )
    time_at = header.index(time_col) if time_col is not None else None
    return header.index(user_col), header.index(item_col), time_at


def _parse_time(source: str, line_no: int, time_col: str | None, value: str) -> float:
    """Parse one timestamp field as a finite float."""
    try:
        time = float(value)
    except ValueError:
        time = math.nan
    if not math.isfinite(time):
        raise DataError(
            f"{source}, line {line_no}: timestamp {value!r} in column {time_col!r} is not a "
            "finite number; use numeric (e.g. Unix) timestamps"
        )
    return time


def _codes_by_first_appearance(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct labels in order of first appearance, (K,), and each entry's code 0..K-1, (n,)."""
    distinct, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first)  # distinct labels, earliest first
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[order] = np.arange(len(distinct))
    return distinct[order], rank[inverse.reshape(-1)]


def _right_aligned_tail(
    values: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int
) -> np.ndarray:
    """(R, width) int64: the last ``width`` of ``values[starts[r]:ends[r]]``, 0-padded at the left."""
    lengths = np.minimum(ends - starts, width)  # (R,)
    columns = np.arange(width)
    first_column = width - lengths  # (R,)
    mask = columns >= first_column[:, None]  # (R, width)
    index = ends[:, None] - width + columns  # (R, width); out of range only where masked
    out = np.zeros((len(starts), width), dtype=np.int64)
    out[mask] = values[index[mask]]
    return out


def _check_max_len(max_len: int) -> None:
    """Reject a non-positive sequence length."""
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")


def _check_csr(indptr: np.ndarray, items: np.ndarray, n_items: int, what: str) -> None:
    """Raise DataError unless (indptr, items) is a valid int64 CSR with ids in 1..n_items."""
    for name, array in (("indptr", indptr), ("items", items)):
        if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != np.int64:
            raise DataError(f"{what}: {name} must be a 1-D int64 numpy array")
    if len(indptr) < 1 or indptr[0] != 0 or indptr[-1] != len(items):
        raise DataError(f"{what}: indptr must start at 0 and end at len(items) = {len(items)}")
    if np.any(np.diff(indptr) < 0):
        raise DataError(f"{what}: indptr must be non-decreasing")
    if items.size and (items.min() < 1 or items.max() > n_items):
        raise DataError(f"{what}: item ids must lie in 1..n_items = {n_items}")
