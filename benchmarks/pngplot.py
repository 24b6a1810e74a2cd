"""A grouped bar chart as a PNG, drawn with Pillow (matplotlib is not installed on our machines).

Pillow comes with vLLM; without it :func:`bar_chart` returns False and the benchmark skips the plot.
Also :func:`line_chart` (latency CDFs, throughput against offered rate). Enough for benchmark results: groups on the x axis (e.g. endpoint counts), one bar per series in
each group, a linear or log10 y axis, optional horizontal target lines, the value over each bar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bar_chart", "line_chart"]

COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]


def _font(size: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _fmt(v: float) -> str:
    if v >= 100_000:
        return f"{v / 1000:,.0f}k"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _step(raw: float) -> float:
    """The 1-2-5 x 10**k step at or above ``raw``: round tick values."""
    base = 10.0 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def bar_chart(
    path: Path,
    title: str,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    ylabel: str,
    log: bool = False,
    targets: dict[str, float] | None = None,
    size: tuple[int, int] = (1000, 560),
) -> bool:
    """Write the chart to ``path``; False when Pillow is missing."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    width, height = size
    left, right, top, bottom = 90, 20, 50, 95
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    small, normal = _font(12), _font(15)
    values = [v for vs in series.values() for v in vs if v > 0]
    values += list((targets or {}).values())
    hi = max(values) * (3 if log else 1.15)
    lo = min(values) / 2 if log else 0.0

    def y(v: float) -> float:
        if log:
            frac = (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        else:
            frac = (v - lo) / (hi - lo)
        return top + (1 - frac) * (height - top - bottom)

    # axes and grid
    d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], "black")
    ticks = (
        [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
        if log
        else [i * _step(hi / 5) for i in range(7)]
    )
    for t in ticks:
        if lo <= t <= hi:
            d.line([(left, y(t)), (width - right, y(t))], "#dddddd")
            d.text((left - 6, y(t)), _fmt(t), "black", small, anchor="rm")
    d.text((width / 2, 18), title, "black", normal, anchor="mm")
    d.text((12, top - 22), ylabel, "black", small)
    # bars
    n = len(series)
    slot = (width - left - right) / len(groups)
    bar = slot * 0.8 / n
    for g, name in enumerate(groups):
        x0 = left + g * slot + slot * 0.1
        for s, vs in enumerate(series.values()):
            v = vs[g]
            if v <= 0:
                continue
            bx = x0 + s * bar
            d.rectangle([bx, y(v), bx + bar - 2, height - bottom], COLOURS[s % len(COLOURS)])
            d.text((bx + bar / 2, y(v) - 3), _fmt(v), "black", small, anchor="mb")
        d.text((left + (g + 0.5) * slot, height - bottom + 8), name, "black", normal, anchor="mt")
    for label, v in (targets or {}).items():
        d.line([(left, y(v)), (width - right, y(v))], "#c00000", 2)
        d.text((width - right - 4, y(v) - 3), label, "#c00000", small, anchor="rb")
    # legend
    lx, ly = left, height - bottom + 36
    for s, label in enumerate(series):
        d.rectangle([lx, ly, lx + 12, ly + 12], COLOURS[s % len(COLOURS)])
        d.text((lx + 18, ly + 6), label, "black", small, anchor="lm")
        lx += 30 + d.textlength(label, small)
        if lx > width - 200:
            lx, ly = left, ly + 20
    img.save(path)
    return True


def line_chart(
    path: Path,
    title: str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    steps: bool = False,
    size: tuple[int, int] = (1000, 560),
) -> bool:
    """One polyline (or step line, for CDFs) per series of (xs, ys); False when Pillow is missing
    or there is nothing to draw."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return False
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)]
    if not points:
        return False
    width, height = size
    left, right, top, bottom = 90, 20, 50, 110
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    small, normal = _font(12), _font(15)
    xs_all = [x for x, _ in points if x > 0 or not log_x]
    x_lo = min(xs_all) / 1.5 if log_x else min(0.0, min(xs_all))
    x_hi = max(xs_all) * (1.5 if log_x else 1.05)
    y_hi = max(y for _, y in points) * 1.1 or 1.0

    def px(x: float) -> float:
        if log_x:
            frac = (math.log10(max(x, x_lo)) - math.log10(x_lo)) / (
                math.log10(x_hi) - math.log10(x_lo)
            )
        else:
            frac = (x - x_lo) / ((x_hi - x_lo) or 1.0)
        return left + frac * (width - left - right)

    def py(y: float) -> float:
        return top + (1 - y / y_hi) * (height - top - bottom)

    d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], "black")
    for i in range(7):
        t = i * _step(y_hi / 5)
        if t <= y_hi:
            d.line([(left, py(t)), (width - right, py(t))], "#dddddd")
            d.text((left - 6, py(t)), _fmt(t), "black", small, anchor="rm")
    xticks = (
        [10.0**k for k in range(math.floor(math.log10(x_lo)), math.ceil(math.log10(x_hi)) + 1)]
        if log_x
        else [x_lo + i * _step((x_hi - x_lo) / 6) for i in range(8)]
    )
    for t in xticks:
        if x_lo <= t <= x_hi:
            d.line([(px(t), height - bottom), (px(t), height - bottom + 5)], "black")
            d.text((px(t), height - bottom + 8), _fmt(t), "black", small, anchor="mt")
    d.text((width / 2, 18), title, "black", normal, anchor="mm")
    d.text((12, top - 22), ylabel, "black", small)
    d.text((width / 2, height - bottom + 26), xlabel, "black", small, anchor="mt")
    for s, (xs, ys) in enumerate(series.values()):
        colour = COLOURS[s % len(COLOURS)]
        pts: list[tuple[float, float]] = []
        for x, y in zip(xs, ys, strict=True):
            if steps and pts:
                pts.append((px(x), pts[-1][1]))
            pts.append((px(x), py(y)))
        if len(pts) > 1:
            d.line(pts, colour, 2)
        for p in pts if not steps else pts[-1:]:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], colour)
    lx, ly = left, height - bottom + 50
    for s, label in enumerate(series):
        d.rectangle([lx, ly, lx + 12, ly + 12], COLOURS[s % len(COLOURS)])
        d.text((lx + 18, ly + 6), label, "black", small, anchor="lm")
        lx += 30 + d.textlength(label, small)
        if lx > width - 200:
            lx, ly = left, ly + 20
    img.save(path)
    return True
