"""The one percentile function, for the harness, the component benchmarks and anything else.

Linear interpolation between closest ranks: numpy's default (``method="linear"``), Hyndman and
Fan's type 7, ``statistics.quantiles(method="inclusive")``. For sorted values ``x[0..n-1]`` the
q-th percentile sits at position ``(n - 1) * q / 100`` and is interpolated between its two
neighbours, so p0 is the minimum, p100 the maximum and one value is every percentile of itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``; ValueError when there are none."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
