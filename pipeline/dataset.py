"""Historical series from CSV files, for training and backtesting.

``wide`` (ETT-like): a time column and numeric columns. Without ``target``/``features`` every
numeric column is its own univariate series named ``STEM.COLUMN``; with them, the file is one
multivariate series. ``long`` (stocks-like): one series per value of ``stream_col``. The time
is one column (epoch s/ms or ISO) or integer columns ``year,month,day[,hour[,minute]]`` (UTC).

Missing values (empty, ``NA``, ``nan``, ``null``) follow the serving rules, so training sees what
the daemon would have done: a row whose target is missing is skipped (the stream's state never
sees it; the next tick's time gap says something was skipped); a missing covariate takes the
stream's previous value of that column, and rows before a covariate's first value are skipped.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.normalize import F64
from pipeline.simulate import open_text, parse_time

_MISSING = {"", "NA", "nan", "NaN", "null"}


@dataclass(frozen=True)
class Series:
    """One stream's history: event times (T,) epoch s, values (T, F), feature names (F)."""

    name: str
    ts: F64
    values: F64
    features: list[str]


def load_series(
    path: Path,
    *,
    fmt: str = "wide",
    target: str | None = None,
    features: Sequence[str] | None = None,
    stream_col: str = "symbol",
    time_col: str | None = None,
) -> list[Series]:
    """Read ``path`` into series; raises DataError naming the missing column or bad value."""
    path = Path(path)
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise DataError("empty CSV", path=str(path))
        rows = list(reader)
    if fmt == "wide":
        return _wide(path, header, rows, target, features, time_col)
    if not target:
        raise DataError("long format needs --target (the value column)", path=str(path))
    return _long(path, header, rows, target, features, stream_col, time_col or "timestamp")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The CSV options shared by ``pipeline train`` and ``pipeline backtest``."""
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="CSV or .csv.gz file (repeatable)")  # fmt: skip
    p.add_argument("--format", choices=["wide", "long"], default="wide")
    p.add_argument("--target", help="target column (default: every numeric column is a series)")
    p.add_argument("--features", help="comma-separated input columns (default: the target)")
    p.add_argument("--stream-col", default="symbol", help="long format: stream id column")
    p.add_argument("--time-col",
                   help="time column, or year,month,day[,hour] columns (wide: first column; "
                        "long: timestamp)")  # fmt: skip
    p.add_argument("--split", help=SPLIT_HELP + f" (train: default {DEFAULT_SPLIT}; backtest: "
                   "default the split the model was trained with)")  # fmt: skip


@dataclass(frozen=True)
class Split:
    """Chronological split of one series, as row indices: train ``[0, train_end)``, validation
    ``[train_end, val_end)``, test ``[val_end, test_end)``; rows from ``test_end`` on are unused."""

    train_end: int
    val_end: int
    test_end: int


# Units of duration splits, in seconds. A month is 30 days: the ETT benchmark protocol's
# 12/4/4 months are 8,640/2,880/2,880 hourly rows from the first one (Informer's borders).
_UNITS = {"h": 3_600.0, "d": 86_400.0, "mo": 30 * 86_400.0}
_DURATION = re.compile(r"^(\d+(?:\.\d*)?)(h|d|mo)$")
DEFAULT_SPLIT = "0.6,0.2"
SPLIT_HELP = (
    "train,validation[,test] sizes: fractions of each series (0.6,0.2: the rest is test) or "
    "durations from its first tick with unit h, d or mo (30 days), e.g. 12mo,4mo,4mo (ETT)"
)


@dataclass(frozen=True)
class SplitSpec:
    """The ``--split`` option: 2 or 3 sizes, fractions of each series or durations in seconds.

    Without a third size the test part runs to the end of the series.
    """

    text: str
    sizes: tuple[float, ...]
    durations: bool

    def points(self, ts: F64) -> Split:
        """Split indices for a series with event times ``ts`` (T,), epoch seconds, ascending."""
        n = len(ts)
        if self.durations:
            ends = np.cumsum(self.sizes) + (ts[0] if n else 0.0)
            # A row belongs to a part when its time is before the part's end.
            idx = np.searchsorted(ts, ends, side="left").tolist()
        else:
            idx = [int(n * f) for f in np.cumsum(self.sizes)]
        return Split(idx[0], idx[1], idx[2] if len(idx) > 2 else n)

    def describe(self) -> str:
        """The scored window in words, for reports."""
        if not self.durations and len(self.sizes) == 2:
            return f"last {1 - sum(self.sizes):.0%} of each series"
        return f"test part of --split {self.text}"


def parse_split(text: str) -> SplitSpec:
    """Parse ``--split``; raises DataError naming the option and the accepted forms."""
    parts = [p.strip() for p in text.split(",")]
    bad = DataError(f"--split {text!r}: {SPLIT_HELP}; fractions must sum below 1")
    if len(parts) not in (2, 3):
        raise bad
    matches = [_DURATION.match(p) for p in parts]
    if all(matches):
        sizes = tuple(float(m.group(1)) * _UNITS[m.group(2)] for m in matches if m)
        if min(sizes) <= 0:
            raise bad
        return SplitSpec(text, sizes, durations=True)
    try:
        fractions = tuple(float(p) for p in parts)
    except ValueError:
        raise bad from None
    limit = 1.0 + 1e-9 if len(parts) == 3 else 1.0  # three fractions may use the whole series
    if min(fractions) <= 0 or sum(fractions) >= limit:
        raise bad
    return SplitSpec(text, fractions, durations=False)


def load_data(args: argparse.Namespace) -> list[Series]:
    """Every series of ``args.data`` read with the options of :func:`add_data_arguments`."""
    features = args.features.split(",") if args.features else None
    series: list[Series] = []
    for path in args.data:
        series += load_series(path, fmt=args.format, target=args.target, features=features,
                              stream_col=args.stream_col, time_col=args.time_col)  # fmt: skip
    if not series:
        raise DataError("no series found in the data files", path=str(args.data[0]))
    return series


def _column(path: Path, header: list[str], name: str) -> int:
    if name not in header:
        raise DataError(f"column {name!r} not in header {header}", path=str(path))
    return header.index(name)


def _wide(
    path: Path,
    header: list[str],
    rows: list[list[str]],
    target: str | None,
    features: Sequence[str] | None,
    time_col: str | None,
) -> list[Series]:
    tcols = _time_columns(path, header, time_col) if time_col else [0]
    ts = _times(path, rows, tcols)
    stem = path.name.split(".")[0]
    if target is None and features is None:
        out = []
        for i, col in enumerate(header):
            if i in tcols:
                continue
            values = _floats(path, rows, [i])
            out.append(apply_missing_rules(f"{stem}.{col}", ts, values, ["value"]))
        return out
    names = list(features) if features else [target or ""]
    if target and target not in names:
        names = [target, *names]
    cols = [_column(path, header, n) for n in names]
    return [
        apply_missing_rules(f"{stem}.{target or names[0]}", ts, _floats(path, rows, cols), names)
    ]


def _long(
    path: Path,
    header: list[str],
    rows: list[list[str]],
    target: str,
    features: Sequence[str] | None,
    stream_col: str,
    time_col: str,
) -> list[Series]:
    names = list(features) if features else [target]
    if target not in names:
        names = [target, *names]
    scol, tcols = _column(path, header, stream_col), _time_columns(path, header, time_col)
    cols = [_column(path, header, n) for n in names]
    groups: dict[str, list[list[str]]] = defaultdict(list)
    for r in rows:
        groups[r[scol]].append(r)
    return [
        apply_missing_rules(stream, _times(path, grows, tcols), _floats(path, grows, cols), names)
        for stream, grows in groups.items()
    ]


def apply_missing_rules(name: str, ts: F64, values: F64, names: list[str]) -> Series:
    """Apply the missing-value rules (module docstring) as the engine does; column 0 is the target.

    Rows with a missing target go first, so a covariate is carried forward from the previous
    *kept* row: the value the stream's state holds.
    """
    kept = ~np.isnan(values[:, 0])
    ts, values = ts[kept], values[kept].copy()
    for c in range(1, values.shape[1]):
        col = values[:, c]
        seen = np.where(~np.isnan(col), np.arange(len(col)), -1)
        np.maximum.accumulate(seen, out=seen)
        col[seen >= 0] = col[seen[seen >= 0]]
    keep = ~np.isnan(values).any(axis=1)
    return Series(name, ts[keep], values[keep], names)


def _time_columns(path: Path, header: list[str], time_col: str) -> list[int]:
    return [_column(path, header, c) for c in time_col.split(",")]


def _times(path: Path, rows: list[list[str]], cols: list[int]) -> F64:
    """Epoch seconds per row from one time column or integer parts year,month,day[,h[,m[,s]]]."""
    if len(cols) == 1:
        return np.array([parse_time(r[cols[0]]) for r in rows])
    if not 3 <= len(cols) <= 6:
        raise DataError("a composite time needs 3 to 6 columns: year,month,day[,hour,...]",
                        path=str(path))  # fmt: skip
    try:
        parts = np.array([[int(r[c]) for c in cols] for r in rows], dtype=np.int64)
    except ValueError as exc:
        raise DataError(f"time columns must be integers: {exc}", path=str(path)) from None
    day_parts = [f"{y:04d}-{m:02d}-{d:02d}" for y, m, d in parts[:, :3].tolist()]
    days = np.array(day_parts, dtype="datetime64[D]").astype(np.int64)  # days since 1970-01-01
    seconds = days * 86_400
    for i, unit in enumerate((3600, 60, 1)):
        if parts.shape[1] > 3 + i:
            seconds = seconds + parts[:, 3 + i] * unit
    return seconds.astype(np.float64)


def _floats(path: Path, rows: list[list[str]], cols: list[int]) -> F64:
    out = np.empty((len(rows), len(cols)))
    for r, row in enumerate(rows):
        for c, col in enumerate(cols):
            raw = row[col]
            try:
                out[r, c] = np.nan if raw in _MISSING else float(raw)
            except ValueError:
                raise DataError(f"row {r + 2}: {raw!r} is not a number", path=str(path)) from None
    return out


def log_target(s: Series, target: int) -> Series:
    """``s`` with its target column replaced by its natural log (DataError if any value <= 0)."""
    column = s.values[:, target]
    if not (column > 0).all():
        raise DataError(f"series {s.name}: --target-transform log needs values > 0")
    values = s.values.copy()
    values[:, target] = np.log(column)
    return replace(s, values=values)
