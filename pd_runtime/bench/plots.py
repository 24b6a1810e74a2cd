"""PNG charts for benchmark results, drawn with matplotlib (the ``bench`` extra; the Agg canvas,
no display and no pyplot state).

:func:`bar_chart`: groups on the x axis (e.g. endpoint counts), one bar per series in each group,
a linear or log10 y axis, optional horizontal target lines, the value over each bar.
:func:`line_chart`: one line per series of (x, y) points, or a step line for CDFs, optionally on a
log10 x axis (latency CDFs, throughput against offered rate). Both write a ``size``-pixel PNG and
return False, writing nothing, when matplotlib is not installed or there is nothing to draw.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["bar_chart", "line_chart"]

COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
DPI = 100


def _fmt(v: float) -> str:
    if v >= 100_000:
        return f"{v / 1000:,.0f}k"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _figure(title: str, size: tuple[int, int]) -> tuple[Any, Any] | None:
    """A figure of ``size`` pixels with one set of axes and a grid; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(axis="y", color="#dddddd")
    ax.set_axisbelow(True)
    return fig, ax


def _log_axis(ax: Any, which: str) -> None:
    """A log10 ``which`` ("x" or "y") axis with plain tick labels (10, 100, 100k)."""
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"set_{which}scale")("log")
    getattr(ax, f"{which}axis").set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))


def _save(fig: Any, ax: Any, path: Path, series: int) -> bool:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=min(series, 4), frameon=False)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the PNG keeps the size asked for
    return True


def bar_chart(
    path: Path,
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    log: bool = False,
    targets: Mapping[str, float] | None = None,
    size: tuple[int, int] = (1000, 560),
) -> bool:
    """Write the chart to ``path``; values <= 0 draw no bar (a missing measurement)."""
    if not groups or not series or (made := _figure(title, size)) is None:
        return False
    fig, ax = made
    width = 0.8 / len(series)
    for s, (label, values) in enumerate(series.items()):
        xs = [g - 0.4 + (s + 0.5) * width for g, v in enumerate(values) if v > 0]
        ys = [v for v in values if v > 0]
        bars = ax.bar(xs, ys, width * 0.95, label=label, color=COLOURS[s % len(COLOURS)])
        ax.bar_label(bars, labels=[_fmt(v) for v in ys], fontsize=8, padding=2)
    for label, v in (targets or {}).items():
        ax.axhline(v, color="#c00000", linewidth=2)
        ax.annotate(
            label, (1.0, v), xycoords=("axes fraction", "data"), ha="right", va="bottom",
            color="#c00000", fontsize=9, xytext=(-4, 3), textcoords="offset points",
        )  # fmt: skip
    ax.set_xticks(range(len(groups)), [textwrap.fill(g, 16) for g in groups])  # no overlaps
    ax.set_ylabel(ylabel)
    if log:
        _log_axis(ax, "y")
    else:
        ax.set_ylim(bottom=0)
    ax.margins(y=0.15)
    return _save(fig, ax, path, len(series))


def line_chart(
    path: Path,
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    steps: bool = False,
    size: tuple[int, int] = (1000, 560),
) -> bool:
    """One line with point markers per series of (xs, ys), or a step line (a CDF: each y holds
    until the next x) marked at its last point; on a log x axis points at x <= 0 are dropped."""
    drawn = {
        name: [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 or not log_x]
        for name, (xs, ys) in series.items()
    }
    if not any(drawn.values()) or (made := _figure(title, size)) is None:
        return False
    fig, ax = made
    for s, (name, points) in enumerate(drawn.items()):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        colour = COLOURS[s % len(COLOURS)]
        if steps:
            ax.step(xs, ys, where="post", color=colour, linewidth=2, label=name)
            ax.plot(xs[-1:], ys[-1:], "o", color=colour, markersize=5)
        else:
            ax.plot(xs, ys, "o-", color=colour, linewidth=2, markersize=5, label=name)
    if log_x:
        _log_axis(ax, "x")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, ax, path, len(series))
