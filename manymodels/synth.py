"""Deterministic synthetic transit-delay data for the demo, the tests and the benchmarks.

:func:`make_transit` builds one row per station per hour with weather, events and a ``delay_min``
target whose behaviour genuinely differs between stations (base level, rush-hour peaks, weather
sensitivity, weekend and event effects, a per-day trend and noise), so that one model per station
is the right tool. :func:`write_transit` writes such a frame as Hive-partitioned or flat Parquet,
and :func:`score_frame` builds the target-less rows for the hours after a training window.

Everything is vectorised with numpy over a ``(stations, hours)`` grid; there is no Python loop
over rows or stations. Randomness does not come from a sequential generator but from a
counter-based hash (SplitMix64 finaliser) of ``(seed, stream, station index, time)``, which gives
these guarantees:

* Same arguments give a bit-identical frame, on any machine.
* A station's coefficients (base delay, peaks, sensitivities, line, ...) depend only on
  ``(seed, station index)``: the first stations of a 500-station frame are the same stations as
  the first ones of a 10,000-station frame.
* Weather, events and noise for a station depend only on ``(seed, station index, absolute UTC
  hour)``, and the trend on the hours elapsed since ``start``. So the frame for
  ``hour_offset=h`` continues the one for ``hour_offset=0`` seamlessly: the last 24 hours of a
  48-hour frame equal a 24-hour frame with ``hour_offset=24``, while different hours always get
  different weather and noise.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Final, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from numpy.typing import NDArray

__all__ = ["COLUMNS", "EVENTS", "LINES", "make_transit", "score_frame", "write_transit"]

LINES: Final[tuple[str, ...]] = ("red", "blue", "green", "orange", "purple")
"""The lines a station can belong to (fixed per station)."""

EVENTS: Final[tuple[str, ...]] = ("none", "concert", "game")
"""The values of the ``event`` column."""

COLUMNS: Final[tuple[str, ...]] = (
    "station",
    "ts",
    "trip_id",
    "line",
    "temp_c",
    "precip_mm",
    "wind_kph",
    "event",
    "delay_min",
)
"""The columns of :func:`make_transit`, in order (``delay_min`` only with the target)."""

_US_PER_HOUR: Final = 3_600_000_000
_MASK64: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15
_MIX1: Final = 0xBF58476D1CE4E5B9
_MIX2: Final = 0x94D049BB133111EB
_REGIONS: Final = 4  # weather regions; every station lies in one
_RAIN_BLOCK_H: Final = 6  # rain spells are decided per region and 6-hour block
_WIND_BLOCK_H: Final = 12  # regional wind level is set every 12 hours and interpolated

# Hour-of-day profiles (index = UTC hour): rush-hour peak shapes and the off-peak service level.
_AM: Final = np.zeros(24)
_AM[[6, 7, 8, 9, 10]] = [0.25, 0.75, 1.0, 0.55, 0.15]
_PM: Final = np.zeros(24)
_PM[[15, 16, 17, 18, 19, 20]] = [0.2, 0.6, 1.0, 0.9, 0.5, 0.15]
_NIGHT: Final = np.ones(24)
_NIGHT[[0, 1, 2, 3, 4, 5, 23]] = [0.6, 0.5, 0.5, 0.5, 0.6, 0.8, 0.8]

# Random stream ids: each independent quantity hashes its own stream.
(
    _S_LINE,
    _S_REGION,
    _S_BASE,
    _S_AM,
    _S_PM_HAS,
    _S_PM,
    _S_PRECIP,
    _S_WIND_HAS,
    _S_WIND,
    _S_WEEKEND,
    _S_WEEKEND_RUSH,
    _S_EVENT_HAS,
    _S_EVENT,
    _S_CONCERT,
    _S_TREND,
    _S_NOISE_SD,
    _S_TEMP_OFF,
    _S_TEMP_DAY,
    _S_TEMP_HOUR,
    _S_RAIN,
    _S_RAIN_MM,
    _S_RAIN_HOUR,
    _S_WIND_BLOCK,
    _S_WIND_HOUR,
    _S_EVENING,
    _S_AFTERNOON,
    _S_NOISE,
    _S_INCIDENT,
) = range(1, 29)

U64 = NDArray[np.uint64]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


def _mix(x: U64) -> U64:
    """SplitMix64 finaliser: a bijective, well-avalanched scramble of 64-bit words."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(_MIX1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_MIX2)
    x ^= x >> np.uint64(31)
    return x


def _as_u64(values: I64) -> U64:
    """Reinterpret signed integers as 64-bit words (negatives wrap, as in two's complement)."""
    return values.astype(np.int64).view(np.uint64)


def _key(seed: int, stream: int, ids: I64) -> U64:
    """Hash ``(seed, stream, id)`` for each id: the per-entity half of a random draw."""
    head = np.array([(seed * _GOLDEN + stream * _MIX1 + _MIX2) & _MASK64], dtype=np.uint64)
    head = _mix(head)
    return _mix(head ^ _mix(_as_u64(ids) * np.uint64(_GOLDEN) + np.uint64(_MIX1)))


def _bits(seed: int, stream: int, rows: I64, cols: I64 | None = None) -> U64:
    """Random 64-bit words for ``rows`` (1-D) or the grid ``rows x cols`` (2-D)."""
    row_key = _key(seed, stream, rows)
    if cols is None:
        return row_key
    col_key = _mix(_as_u64(cols) * np.uint64(_MIX2) + np.uint64(_GOLDEN))
    return _mix(row_key[:, None] + col_key[None, :])


def _uniform(seed: int, stream: int, rows: I64, cols: I64 | None = None) -> F64:
    """Uniform draws in the open interval (0, 1), one per id or grid cell."""
    bits = _bits(seed, stream, rows, cols) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * 2.0**-53


def _normal(seed: int, stream: int, rows: I64, cols: I64 | None = None) -> F64:
    """Standard normal draws (Box-Muller on the two 32-bit halves of one random word)."""
    bits = _bits(seed, stream, rows, cols)
    u1 = ((bits >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
    u2 = ((bits & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) * 2.0**-32
    return cast(F64, np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))


def _utc_us(start: str) -> int:
    """``start`` as microseconds since the Unix epoch (a naive time is taken to be UTC)."""
    stamp = pd.Timestamp(start)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.value) // 1000


def _station_ids(n_stations: int) -> Any:
    """Arrow strings ``stn-00000``, ... (zero-padded to at least 5 digits, so they sort by index)."""
    width = max(5, len(str(max(n_stations - 1, 0))))
    digits = pc.cast(pa.array(np.arange(n_stations, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise("stn", pc.utf8_lpad(digits, width, "0"), "-")


def _lookup(labels: tuple[str, ...], codes: NDArray[np.integer[Any]]) -> Any:
    """Arrow strings ``labels[codes]`` (codes flattened), built without Python objects per row."""
    return pa.array(labels, type=pa.string()).take(pa.array(codes.ravel().astype(np.int32)))


def make_transit(
    n_stations: int = 500,
    hours: int = 24 * 28,
    *,
    seed: int = 7,
    start: str = "2026-01-05T00:00:00",
    with_target: bool = True,
    hour_offset: int = 0,
) -> pd.DataFrame:
    """Generate hourly transit-delay rows for ``n_stations`` stations.

    Args:
        n_stations: Number of stations, ``stn-00000`` ... (ids widen past 100,000 stations).
        hours: Number of consecutive hours per station.
        seed: Seed of every random quantity; see the module docstring for what it guarantees.
        start: Reference start time (ISO 8601; naive means UTC). The trend counts from here.
        with_target: Whether to include the ``delay_min`` target column.
        hour_offset: The first row is ``start + hour_offset`` hours; use it to build the rows
            that follow a training window (see :func:`score_frame`).

    Returns:
        One row per station and hour, sorted by ``(station, ts)``, with columns
        ``station`` (str), ``ts`` (``datetime64[us, UTC]``), ``trip_id`` (str, unique per row:
        ``"<station>-<hour index since start>"``), ``line`` (str), ``temp_c``, ``precip_mm``,
        ``wind_kph`` (float64), ``event`` (str: ``none``/``concert``/``game``) and, if
        ``with_target``, ``delay_min`` (float64, minutes, >= 0).

    Raises:
        ValueError: If ``n_stations`` or ``hours`` is negative.
    """
    if n_stations < 0 or hours < 0:
        raise ValueError(f"n_stations and hours must be >= 0, got {n_stations} and {hours}")
    start_us = _utc_us(start)
    stations = np.arange(n_stations, dtype=np.int64)
    steps = np.arange(hours, dtype=np.int64) + hour_offset  # hour index since `start`

    # --- time axis (length `hours`): every calendar quantity is UTC-based ---------------------
    ts_us = start_us + steps * _US_PER_HOUR
    ehour = ts_us // _US_PER_HOUR  # absolute epoch hour: the time key of all hourly draws
    hod = ehour % 24
    eday = ehour // 24
    weekend = ((eday + 3) % 7) >= 5  # 1970-01-01 was a Thursday
    days_since_start = (ts_us - start_us) / (24 * _US_PER_HOUR)

    # --- per-station coefficients (length `n_stations`), depending on (seed, index) only --------
    line = np.minimum((_uniform(seed, _S_LINE, stations) * len(LINES)).astype(np.int64), 4)
    region = np.minimum((_uniform(seed, _S_REGION, stations) * _REGIONS).astype(np.int64), 3)
    base = np.exp(0.9 + 0.6 * _normal(seed, _S_BASE, stations))  # median ~2.5 min
    am_amp = 1.0 + 11.0 * _uniform(seed, _S_AM, stations)
    pm_amp = np.where(
        _uniform(seed, _S_PM_HAS, stations) < 0.25, 0.0, 1.0 + 13.0 * _uniform(seed, _S_PM, stations)
    )
    precip_sens = np.exp(-0.7 + 1.1 * _normal(seed, _S_PRECIP, stations))  # min per mm/h
    wind_sens = np.where(
        _uniform(seed, _S_WIND_HAS, stations) < 0.3,
        0.0,
        0.02 + 0.3 * _uniform(seed, _S_WIND, stations) ** 2,
    )  # min per kph above 15
    weekend_shift = -3.0 + 4.5 * _uniform(seed, _S_WEEKEND, stations)
    weekend_rush = 0.15 + 0.35 * _uniform(seed, _S_WEEKEND_RUSH, stations)
    event_sens = np.where(
        _uniform(seed, _S_EVENT_HAS, stations) < 0.45, 0.0, 3.0 + 17.0 * _uniform(seed, _S_EVENT, stations)
    )
    concert_ratio = 0.4 + 0.8 * _uniform(seed, _S_CONCERT, stations)
    trend = 0.06 * _normal(seed, _S_TREND, stations)  # min per day
    noise_sd = 0.6 + 1.8 * _uniform(seed, _S_NOISE_SD, stations)
    temp_offset = 0.8 * _normal(seed, _S_TEMP_OFF, stations)

    # --- weather: regional spells and levels, plus per-station hourly variation ------------------
    doy = (ehour / 24.0) % 365.2425
    temp_time = 8.0 - 10.0 * np.cos(2 * np.pi * (doy - 15.0) / 365.2425)
    temp_time += 4.0 * np.sin(2 * np.pi * (hod - 9) / 24.0)
    if hours:
        days = np.arange(eday[0], eday[-1] + 2, dtype=np.int64)
        anomaly = 3.0 * _normal(seed, _S_TEMP_DAY, days)
        frac = (ehour % 24) / 24.0
        day_i = eday - eday[0]
        temp_time += anomaly[day_i] * (1.0 - frac) + anomaly[day_i + 1] * frac

    regions = np.arange(_REGIONS, dtype=np.int64)
    rain_block = ehour // _RAIN_BLOCK_H
    rain_blocks = np.unique(rain_block)
    rain_pos = np.searchsorted(rain_blocks, rain_block)
    raining_rb = _uniform(seed, _S_RAIN, regions, rain_blocks) < 0.14
    intensity_rb = np.exp(0.2 + 0.8 * _normal(seed, _S_RAIN_MM, regions, rain_blocks))
    spell = np.where(raining_rb, intensity_rb, 0.0)[region[:, None], rain_pos[None, :]]
    rain_hour = _normal(seed, _S_RAIN_HOUR, stations, ehour)
    precip = np.round(spell * np.exp(0.5 * rain_hour - 0.125), 1)
    precip[(rain_hour < -1.0) & (precip > 0)] = 0.0  # dry hours inside a spell

    wind_block = ehour // _WIND_BLOCK_H
    wind_blocks = np.arange(wind_block[0], wind_block[-1] + 2, dtype=np.int64) if hours else wind_block
    level = 8.0 - 8.0 * np.log(_uniform(seed, _S_WIND_BLOCK, regions, wind_blocks))
    wfrac = (ehour % _WIND_BLOCK_H) / _WIND_BLOCK_H
    wi = wind_block - (wind_block[0] if hours else 0)
    wind_rt = level[:, wi] * (1.0 - wfrac) + level[:, wi + 1] * wfrac
    wind_rt += 3.0 * np.sin(2 * np.pi * (hod - 10) / 24.0)
    wind = wind_rt[region] + 3.0 * np.abs(_normal(seed, _S_WIND_HOUR, stations, ehour))
    wind += np.where(spell > 0, 4.0, 0.0)
    wind = np.maximum(wind, 0.0).round(1)

    temp = temp_time[None, :] + temp_offset[:, None] + 0.4 * _normal(seed, _S_TEMP_HOUR, stations, ehour)
    temp = np.round(temp - np.where(spell > 0, 1.5, 0.0), 1)

    # --- events: decided per station and day, active in the evening (or weekend afternoons) --
    if hours:
        ev_days = np.arange(eday[0], eday[-1] + 1, dtype=np.int64)
        ev_i = eday - eday[0]
        evening = _uniform(seed, _S_EVENING, stations, ev_days)[:, ev_i]
        afternoon = _uniform(seed, _S_AFTERNOON, stations, ev_days)[:, ev_i]
    else:
        evening = afternoon = np.ones((n_stations, 0))
    game_evening = (evening < 0.05) & ((hod >= 17) & (hod <= 21))[None, :]
    concert = (evening >= 0.05) & (evening < 0.09) & ((hod >= 19) & (hod <= 23))[None, :]
    game_afternoon = (afternoon < 0.12) & (weekend & (hod >= 12) & (hod <= 15))[None, :]
    game = game_evening | game_afternoon
    event = np.where(game, 2, np.where(concert, 1, 0))

    columns: dict[str, Any] = {}
    ids = _station_ids(n_stations)
    station_col = ids.take(pa.array(np.repeat(stations, hours)))
    columns["station"] = station_col
    columns["ts"] = pa.array(np.tile(ts_us, n_stations), type=pa.timestamp("us", tz="UTC"))
    step_txt = pc.cast(pa.array(steps), pa.string()).take(pa.array(np.tile(np.arange(hours), n_stations)))
    columns["trip_id"] = pc.binary_join_element_wise(station_col, step_txt, "-")
    columns["line"] = _lookup(LINES, np.repeat(line, hours))
    columns["temp_c"] = temp.ravel()
    columns["precip_mm"] = precip.ravel()
    columns["wind_kph"] = wind.ravel()
    columns["event"] = _lookup(EVENTS, event)

    if with_target:
        is_we = weekend[None, :]
        rush = am_amp[:, None] * _AM[hod][None, :] + pm_amp[:, None] * _PM[hod][None, :]
        rush *= np.where(is_we, weekend_rush[:, None], 1.0)
        delay = base[:, None] * _NIGHT[hod][None, :] + rush + np.where(is_we, weekend_shift[:, None], 0.0)
        delay += precip_sens[:, None] * precip * (1.0 + 0.05 * rush)
        delay += wind_sens[:, None] * np.maximum(wind - 15.0, 0.0)
        delay += 0.15 * np.maximum(-temp, 0.0)
        delay += event_sens[:, None] * np.where(game, 1.0, np.where(concert, concert_ratio[:, None], 0.0))
        delay += trend[:, None] * days_since_start[None, :]
        delay += noise_sd[:, None] * _normal(seed, _S_NOISE, stations, ehour)
        incident = _uniform(seed, _S_INCIDENT, stations, ehour)
        tail = np.minimum(-12.0 * np.log(incident / 0.004), 90.0)
        delay += np.where(incident < 0.004, tail, 0.0)  # rare incidents: a long tail
        columns["delay_min"] = np.maximum(delay, 0.0).ravel()

    table = pa.table({name: columns[name] for name in COLUMNS if name in columns})
    return cast(pd.DataFrame, table.to_pandas())


def score_frame(
    n_stations: int = 500,
    hours: int = 24,
    *,
    seed: int = 7,
    after_hours: int = 24 * 28,
) -> pd.DataFrame:
    """Rows to score: the ``hours`` after a ``make_transit(..., hours=after_hours)`` window.

    Args:
        n_stations: Number of stations.
        hours: Number of hours to score per station.
        seed: The seed the training data was generated with.
        after_hours: Length of the training window; scoring starts right after it.

    Returns:
        ``make_transit(n_stations, hours, seed=seed, with_target=False, hour_offset=after_hours)``.
    """
    return make_transit(n_stations, hours, seed=seed, with_target=False, hour_offset=after_hours)


def _clear(root: str) -> None:
    """Create ``root``, or remove the Parquet files and ``station=`` folders already in it."""
    os.makedirs(root, exist_ok=True)
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and entry.name.startswith("station="):
                shutil.rmtree(entry.path)
            elif entry.is_file(follow_symlinks=False) and entry.name.endswith(".parquet"):
                os.remove(entry.path)


def _sorted_table(df: pd.DataFrame) -> tuple[Any, I64]:
    """``df`` as an Arrow table sorted by ``(station, ts)``, plus the row count per station.

    Large strings become plain Arrow strings so that the files carry ``string`` columns.
    """
    raw_codes, uniques = pd.factorize(df["station"], sort=True)
    codes = np.asarray(raw_codes, dtype=np.int64)
    codes[codes < 0] = len(uniques)  # null stations sort last, as one group
    ts = np.asarray(pd.factorize(df["ts"], sort=True)[0], dtype=np.int64)
    order: I64 | None = None
    if len(codes) > 1:
        same = codes[1:] == codes[:-1]
        if not (np.all(codes[1:] >= codes[:-1]) and np.all(~same | (ts[1:] >= ts[:-1]))):
            order = np.lexsort((ts, codes)).astype(np.int64)
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [
        pa.field(f.name, pa.string(), f.nullable, f.metadata) if pa.types.is_large_string(f.type) else f
        for f in table.schema
    ]
    table = table.cast(pa.schema(fields))  # no pandas metadata: plain files for any reader
    if order is not None:
        table = table.take(pa.array(order))
        codes = codes[order]
    counts = np.bincount(codes).astype(np.int64) if len(codes) else np.zeros(0, np.int64)
    return table, counts


def write_transit(
    df: pd.DataFrame,
    root: str,
    *,
    layout: str = "hive",
    files: int = 8,
    row_group_size: int = 50_000,
) -> list[str]:
    """Write a transit frame as Parquet under the local directory ``root``.

    ``root`` is created if needed; Parquet files and ``station=`` folders already in it are
    removed first, so afterwards it holds exactly ``df``.

    Args:
        df: A frame with at least ``station`` and ``ts`` columns (e.g. from :func:`make_transit`).
        root: Local output directory.
        layout: ``"hive"`` writes ``root/station=<id>/part-0.parquet`` (the station column lives
            in the folder name only); ``"flat"`` writes ``files`` files ``part-000.parquet``, ...
            each holding a contiguous range of stations, sorted by ``(station, ts)``.
        files: Number of files for the flat layout (fewer if there are fewer stations).
        row_group_size: Maximum rows per Parquet row group.

    Returns:
        The written file paths (``root`` joined with the relative path), sorted.

    Raises:
        ValueError: On an unknown layout or non-positive ``files`` / ``row_group_size``.
    """
    if layout not in ("hive", "flat"):
        raise ValueError(f"layout must be 'hive' or 'flat', got {layout!r}")
    if files < 1 or row_group_size < 1:
        raise ValueError(f"files and row_group_size must be >= 1, got {files} and {row_group_size}")
    table, counts = _sorted_table(df)
    _clear(root)
    written: list[str] = []
    if layout == "flat":
        bounds = np.concatenate([[0], np.cumsum(counts)])
        n_files = max(1, min(files, len(counts)))
        chunks = np.array_split(np.arange(len(counts)), n_files)
        for i, chunk in enumerate(chunks):
            lo = int(bounds[chunk[0]]) if len(chunk) else 0
            hi = int(bounds[chunk[-1] + 1]) if len(chunk) else table.num_rows
            path = os.path.join(root, f"part-{i:03d}.parquet")
            pq.write_table(table.slice(lo, hi - lo), path, row_group_size=row_group_size)
            written.append(path)
        return sorted(written)

    if table.num_rows == 0:
        return []
    base = os.path.abspath(root)

    def visit(file: Any) -> None:
        written.append(os.path.join(root, os.path.relpath(str(file.path), base)))

    ds.write_dataset(
        table,
        base,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([pa.field("station", pa.string())]), flavor="hive"),
        basename_template="part-{i}.parquet",
        max_partitions=max(1024, len(counts) + 1),
        max_rows_per_group=row_group_size,
        existing_data_behavior="overwrite_or_ignore",
        preserve_order=True,
        file_visitor=visit,
    )
    return sorted(written)
