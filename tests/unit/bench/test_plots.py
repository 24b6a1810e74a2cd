"""The benchmark charts (pd_runtime.bench.plots): real PNGs of the size asked for."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pd_runtime.bench.plots import bar_chart, line_chart

__all__: list[str] = []

pytest.importorskip("matplotlib")  # the dev and bench extras install it


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk (the first chunk of every PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_bar_chart_writes_a_png_of_the_requested_size(tmp_path: Path) -> None:
    path = tmp_path / "bars.png"
    drawn = bar_chart(
        path,
        "Latency through each path",
        ["direct", "sidecar", "coordinator"],
        {"TTFT p50": [1.2, 2.5, 3.1], "TTFT p99": [5.0, 0.0, 1200.0]},  # 0: no bar
        ylabel="ms (log scale)",
        log=True,
        targets={"target": 100.0},
        size=(1400, 620),
    )
    assert drawn and path.stat().st_size > 1000
    assert _png_size(path) == (1400, 620)


def test_line_chart_cdf_and_linear(tmp_path: Path) -> None:
    cdf = tmp_path / "cdf.png"
    series = {"a": ([10.0, 10.0, 20.0, 40.0], [0.0, 0.33, 0.66, 1.0]), "b": ([15.0], [1.0])}
    assert line_chart(
        cdf, "TTFT CDF", series, xlabel="TTFT (ms, log scale)", ylabel="fraction", log_x=True,
        steps=True,
    )  # fmt: skip
    assert _png_size(cdf) == (1000, 560)
    rate = tmp_path / "rate.png"
    assert line_chart(rate, "rps", {"x": ([0.5, 1, 2], [0.5, 0.9, 1.2])}, xlabel="r", ylabel="y")
    assert _png_size(rate) == (1000, 560) and rate.stat().st_size > 1000


def test_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    assert not line_chart(path, "t", {"a": ([], [])}, xlabel="x", ylabel="y")
    assert not bar_chart(path, "t", [], {}, ylabel="y")
    assert not path.exists()
