"""Historical series from CSV files, for training and backtesting.

``wide`` (ETT-like): a time column and numeric columns. Without ``target``/``features`` every
numeric column is its own univariate series named ``STEM.COLUMN``; with them, the file is one
multivariate series. ``long`` (stocks-like): one series per value of ``stream_col``.
Rows whose used values are missing (empty/NA) are skipped for now.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
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
    tcol = _column(path, header, time_col) if time_col else 0
    ts = np.array([parse_time(r[tcol]) for r in rows])
    stem = path.name.split(".")[0]
    if target is None and features is None:
        out = []
        for i, col in enumerate(header):
            if i == tcol:
                continue
            values = _floats(path, rows, [i])
            keep = ~np.isnan(values).any(axis=1)
            out.append(Series(f"{stem}.{col}", ts[keep], values[keep], ["value"]))
        return out
    names = list(features) if features else [target or ""]
    if target and target not in names:
        names = [target, *names]
    cols = [_column(path, header, n) for n in names]
    values = _floats(path, rows, cols)
    keep = ~np.isnan(values).any(axis=1)
    return [Series(f"{stem}.{target or names[0]}", ts[keep], values[keep], names)]


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
    scol, tcol = _column(path, header, stream_col), _column(path, header, time_col)
    cols = [_column(path, header, n) for n in names]
    groups: dict[str, list[list[str]]] = defaultdict(list)
    for r in rows:
        groups[r[scol]].append(r)
    out = []
    for stream, grows in groups.items():
        ts = np.array([parse_time(r[tcol]) for r in grows])
        values = _floats(path, grows, cols)
        keep = ~np.isnan(values).any(axis=1)
        out.append(Series(stream, ts[keep], values[keep], names))
    return out


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
