"""The one percentile function (pd_runtime.common.stats): numpy's default interpolation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pd_runtime.common.stats import percentile

__all__: list[str] = []


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    rng = random.Random(3)
    xs = [rng.random() for _ in range(101)]
    for q in (1, 37.5, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_no_values_and_q_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="not in"):
        percentile([1.0], 101)
