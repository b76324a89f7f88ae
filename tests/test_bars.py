"""Bars files and the features computed from them: what a backtest reads, and what it
refuses, by file, line, column and reason; features that never look ahead."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from negcase.sim.bars import BarsError, read_bars
from negcase.sim.features import (
    BUILTIN_NAMES,
    BUILTIN_WARMUP_BARS,
    FeatureError,
    builtin_features,
    feature_table,
    load_feature_function,
)
from tests.market_data import sp500_csv

HEADER = "Date,Open,High,Low,Close,Adj Close,Volume\n"
GOOD = HEADER + "1/4/1999,10,11,9,10.5,10.5,100\n"


def write(tmp_path: Path, text: str, name: str = "bars.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_real_bars_are_read_from_a_gzipped_csv_as_arch_ships_them(tmp_path):
    # given the first 300 daily S&P 500 bars, gzipped
    path = tmp_path / "sp500.csv.gz"
    path.write_bytes(gzip.compress(sp500_csv(300).encode()))
    # when they are read
    bars = read_bars(path)
    # then every column arrives, dates in order, month/day/year understood
    assert len(bars) == 300
    assert (bars.label(0), bars.label(299)) == ("1999-01-04", "2000-03-10")
    assert bars.close[0] == pytest.approx(1228.099976)
    assert bars.volume[0] == 877_000_000
    assert (np.diff(bars.times_ms) > 0).all()


@pytest.mark.parametrize(
    ("header_and_row", "label"),
    [
        ("time,OPEN,high,Low,CLOSE,volume\n2019-01-31,1,2,1,2,0\n", "2019-01-31"),
        (
            "timestamp,open,high,low,close,volume\n2019-01-31T15:30:00+00:00,1,2,1,2,0\n",
            "2019-01-31 15:30",
        ),
        ("\ufeffDateTime,open,high,low,close,volume\n1548948600,1,2,1,2,0\n", "2019-01-31 15:30"),
        ("date,open,high,low,close,volume\n1548948600000,1,2,1,2,0\n", "2019-01-31 15:30"),
        # the first and the last time a trade can carry
        ("date,open,high,low,close,volume\n1970-01-01,1,2,1,2,0\n", "1970-01-01"),
        ("date,open,high,low,close,volume\n253402300799999,1,2,1,2,0\n", "9999-12-31 23:59"),
    ],
)
def test_column_names_in_any_case_and_the_usual_time_formats_are_read(
    tmp_path, header_and_row, label
):
    bars = read_bars(write(tmp_path, header_and_row))
    assert bars.label(0) == label


@pytest.mark.parametrize(
    ("text", "line", "column", "reason"),
    [
        ("Date,Open,High,Low,Volume\n1/4/1999,1,2,1,5\n", 1, "close", "no 'close' column"),
        ("Day,Open,High,Low,Close,Volume\n1/4/1999,1,2,1,2,5\n", 1, None, "no date/time column"),
        (GOOD + "1/5/1999,10,11,9,ten,10,100\n", 3, "Close", "'ten' is not a number"),
        (GOOD + "1/5/1999,10,11,9,,10,100\n", 3, "Close", "'' is not a number"),
        (GOOD + "1/5/1999,10,11,9,nan,10,100\n", 3, "Close", "not a finite number"),
        (GOOD + "1/5/1999,0,11,9,10,10,100\n", 3, "Open", "not a positive price"),
        (GOOD + "1/5/1999,10,11,9,10,10,-1\n", 3, "Volume", "is negative"),
        (GOOD + "1/5/1999,10,8,9,10,10,100\n", 3, "High", "below the low"),
        (GOOD + "1/3/1999,10,11,9,10,10,100\n", 3, "Date", "strictly increasing time order"),
        (GOOD + "1/4/1999,10,11,9,10,10,100\n", 3, "Date", "strictly increasing time order"),
        (GOOD + "yesterday,10,11,9,10,10,100\n", 3, "Date", "'yesterday' is not a date"),
        (GOOD + "13/5/1999,10,11,9,10,10,100\n", 3, "Date", "month must be in 1..12"),
        (HEADER + "1969-12-31,10,11,9,10,10,100\n", 2, "Date", "before 1970-01-01 00:00 UTC"),
        (HEADER + "7/1/1926,10,11,9,10,10,100\n", 2, "Date", "'7/1/1926' is before 1970-01-01"),
        (HEADER + "1970-01-01T00:30+01:00,10,11,9,10,10,100\n", 2, "Date", "before 1970-01-01"),
        (GOOD + "253402300800000,10,11,9,10,10,100\n", 3, "Date", "after 9999-12-31 (UTC)"),
        (GOOD + "1700000000000000,10,11,9,10,10,100\n", 3, "Date", "in microseconds or nano"),
        (GOOD + "9" * 400 + ",10,11,9,10,10,100\n", 3, "Date", "after 9999-12-31 (UTC)"),
        (GOOD + "1/5/1999,10,11\n", 3, "Low", "too few to reach it"),
    ],
)
def test_a_file_that_cannot_be_used_names_line_column_and_reason(
    tmp_path, text, line, column, reason
):
    path = write(tmp_path, text)
    with pytest.raises(BarsError) as raised:
        read_bars(path)
    error = raised.value
    assert (error.line, error.column) == (line, column)
    assert reason in error.reason
    where = f"{path}, line {line}" + (f", column {column!r}" if column else "")
    assert str(error).startswith(where)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"Date,Open,High,Low,Close,Volume\n", "no bars"),
        (b"\x1f\x8b\x08garbage", "not a readable gzip file"),
        (b"Date\xff\n", "not UTF-8"),
    ],
)
def test_an_unreadable_file_says_why(tmp_path, content, reason):
    path = tmp_path / "bars.csv"
    path.write_bytes(content)
    with pytest.raises(BarsError, match=re.escape(reason)):
        read_bars(path)
    with pytest.raises(BarsError, match="cannot be read"):
        read_bars(tmp_path / "missing.csv")


def test_builtin_features_never_look_at_the_bar_being_decided_or_later(tmp_path):
    # given real bars, and a copy whose bars from t on are replaced by wild values
    bars = read_bars(write(tmp_path, sp500_csv(200)))
    t = 150
    changed = read_bars(write(tmp_path, sp500_csv(200), "changed.csv"))
    for column in (changed.open, changed.high, changed.low, changed.close):
        column[t:] *= 3.0
    # when the features of every bar are computed on both
    table, other = feature_table(bars, builtin_features), feature_table(changed, builtin_features)
    # then every decision up to t sees the same numbers, and only later ones differ
    assert np.array_equal(table.rows[: t + 1], other.rows[: t + 1], equal_nan=True)
    assert not np.array_equal(table.rows[t + 1 :], other.rows[t + 1 :])
    # and the first decision is the first bar with enough history, eight numbers each
    assert (table.first, table.count) == (BUILTIN_WARMUP_BARS, len(BUILTIN_NAMES))
    assert (
        np.isnan(table.rows[: table.first]).all() and np.isfinite(table.rows[table.first :]).all()
    )


def three_features(past):
    """A user's feature function: needs two closed bars."""
    return None if len(past) < 2 else [past.close[-1], past.close[-2], float(len(past))]


def features_that_break(past):
    """A user's feature function that returns NaN on the tenth decision."""
    return [float("nan") if len(past) == 10 else 1.0]


def features_too_large(past):
    """A user's feature function whose second number is finite but beyond float32."""
    return [1.0, 1e39]


def test_a_users_feature_function_is_loaded_and_checked_bar_by_bar(tmp_path):
    bars = read_bars(write(tmp_path, sp500_csv(30)))
    table = feature_table(bars, load_feature_function("tests.test_bars:three_features"))
    assert (table.first, table.count) == (2, 3)
    assert table.rows[5].tolist() == [bars.close[4], bars.close[3], 5.0]
    with pytest.raises(FeatureError, match=r"bar 10 \(1999-01-19\): value 0 is nan"):
        feature_table(bars, features_that_break)
    with pytest.raises(FeatureError, match=r"bar 1 \(1999-01-05\): value 1 is 1e\+39"):
        feature_table(bars, features_too_large)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("three_features", "expected 'package.module:function'"),
        ("tests.no_such_module:f", "cannot import tests.no_such_module"),
        ("tests.test_bars:nothing_here", "has no function nothing_here"),
    ],
)
def test_a_feature_function_that_cannot_be_loaded_says_why(path, reason):
    with pytest.raises(FeatureError, match=re.escape(reason)):
        load_feature_function(path)
