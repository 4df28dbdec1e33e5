"""The transit demo job's ``prepare`` step: calendar and weather features for one station.

manymodels calls :func:`prepare` once per partition (one station's rows), before training AND
before scoring, so the same features are built both times. It runs many thousands of times on a
few hundred rows each, so it works on the raw numpy values (well under a millisecond per call)
instead of the slower ``.dt`` accessors or ``DataFrame.assign``.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pandas as pd
from numpy.typing import NDArray

__all__ = ["FEATURES", "prepare"]

FEATURES = ("hour", "dow", "is_weekend", "rush", "rain")
"""The columns :func:`prepare` adds."""

_PER_HOUR = {"s": 3_600, "ms": 3_600_000, "us": 3_600_000_000, "ns": 3_600_000_000_000}
_RUSH = np.zeros(24, dtype=np.int64)
_RUSH[[7, 8, 9, 16, 17, 18, 19]] = 1


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add calendar and weather features to one station's rows (the input is not modified).

    Args:
        df: Rows with at least ``ts`` (timestamps; the wall clock of their time zone is used,
            naive ones as they are) and ``precip_mm``; ``delay_min`` may be present or not, and
            the frame may be empty.

    Returns:
        A new frame with all input columns plus ``hour`` (0-23), ``dow`` (Monday=0),
        ``is_weekend`` (0/1) and ``rush`` (1 for hours 7-9 and 16-19, else 0) as int64 (-1, -1,
        0, 0 where ``ts`` is missing), and ``rain`` (``precip_mm`` clipped to [0, 20], float64).
        Feature columns already in ``df`` are replaced.
    """
    ts = df["ts"]
    if not pd.api.types.is_datetime64_any_dtype(ts.dtype):
        ts = pd.to_datetime(ts, utc=True)
    elif isinstance(ts.dtype, pd.DatetimeTZDtype) and str(ts.dtype.tz) != "UTC":
        ts = ts.dt.tz_localize(None)  # local wall clock
    values = cast(Any, ts.array)  # a DatetimeArray; its int64 ticks are not in pandas-stubs
    ticks = cast(NDArray[np.int64], values.asi8)
    epoch_hours = ticks // _PER_HOUR[str(values.unit)]
    hour = epoch_hours % 24
    dow = (epoch_hours // 24 + 3) % 7  # 1970-01-01 was a Thursday
    missing = ticks == np.iinfo(np.int64).min  # NaT
    if missing.any():
        hour = np.where(missing, -1, hour)
        dow = np.where(missing, -1, dow)
    features = pd.DataFrame(
        {
            "hour": hour,
            "dow": dow,
            "is_weekend": (dow >= 5).astype(np.int64),
            "rush": np.where(hour >= 0, _RUSH[hour], 0),
            "rain": np.clip(df["precip_mm"].to_numpy(dtype=np.float64, na_value=np.nan), 0.0, 20.0),
        },
        index=df.index,
    )
    present = [c for c in FEATURES if c in df.columns]
    base = df.drop(columns=present) if present else df
    return pd.concat([base, features], axis=1)
