"""Small line/point charts as inline SVG, for the status page: no matplotlib, no fonts, no network.

``chart(...)`` lays a chart out (scales, ticks, points in pixel coordinates) into a plain dict that the
``/dashboard`` JSON carries; ``svg(chart)`` draws it on the server and ``static/status.js`` draws the same dict
in the browser, so both pages show the same picture and the layout math lives only here.
"""

from __future__ import annotations

import math
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 460, 220  # viewBox units; drawn ~400-450 px wide on a laptop screen
MARGIN = {"left": 50, "right": 12, "top": 10, "bottom": 40}
MAX_CIRCLES = 3000  # beyond this many points a series is drawn as a line only (an SVG stays light)


def nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values ("nice numbers": 1, 2, 2.5, 5 x 10^k; whole numbers when ``integer``) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, round(step) if step >= 1 else 1.0)
    first = math.floor(low / step + 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-6:
        if value >= low - step * 1e-6:
            ticks.append(round(value, 10))
        value += step
    return ticks or [low, high]


def fmt_tick(value: float, step: float) -> str:
    if step >= 1 and float(value).is_integer():
        n = int(value)
        return f"{n / 1000:g}k" if abs(n) >= 10000 and n % 1000 == 0 else str(n)
    exp = math.floor(math.log10(step))
    mantissa = step / 10 ** exp
    decimals = max(0, -exp + (0 if abs(mantissa - round(mantissa)) < 1e-6 else 1))
    return f"{value:.{min(decimals, 6)}f}"


def _extent(values: list[float], fixed: tuple[float, float] | None) -> tuple[float, float]:
    if fixed is not None:
        return fixed
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def chart(series: list[dict], *, title: str, x_label: str, y_label: str, y_range: tuple[float, float] | None = None,
          x_range: tuple[float, float] | None = None, x_tick_labels: dict | None = None, y_from_zero: bool = False,
          x_integer: bool = False,
          width: int = WIDTH, height: int = HEIGHT) -> dict:
    """Lay out ``series`` (each ``{"name", "cls", "kind": "points"|"line"|"both", "points": [(x, y), ...]}``).

    Returns ``{"width", "height", "title", "x_label", "y_label", "frame": {left, top, right, bottom},
    "x_ticks"/"y_ticks": [{"pos", "label"}], "series": [{"name", "cls", "kind", "n", "points": [[px, py]]}],
    "empty"}``. ``x_tick_labels`` maps x values to tick labels (categorical axes: one tick per value)."""
    xs = [float(x) for s in series for x, _ in s["points"]]
    ys = [float(y) for s in series for _, y in s["points"] if y is not None]
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = width - MARGIN["right"], height - MARGIN["bottom"]
    x0, x1 = _extent(xs, x_range)
    y0, y1 = _extent(ys, y_range)
    if y_from_zero and y_range is None and ys:
        y0 = min(0.0, y0)
    if x_tick_labels:
        x_ticks_values = sorted(float(v) for v in x_tick_labels)
        if x0 == x1 or len(x_ticks_values) == 1:
            x0, x1 = x0 - 1, x1 + 1
        else:
            pad = (x1 - x0) * 0.05
            x0, x1 = x0 - pad, x1 + pad
    else:
        x_ticks_values = nice_ticks(x0, x1, integer=x_integer)
        x0, x1 = min(x0, x_ticks_values[0]), max(x1, x_ticks_values[-1])
    y_ticks_values = nice_ticks(y0, y1)
    if y_range is None:
        y0, y1 = min(y0, y_ticks_values[0]), max(y1, y_ticks_values[-1])

    def px(x: float) -> float:
        return round(left + (float(x) - x0) / ((x1 - x0) or 1) * (right - left), 1)

    def py(y: float) -> float:
        return round(bottom - (float(y) - y0) / ((y1 - y0) or 1) * (bottom - top), 1)

    def step_of(values: list[float]) -> float:
        return values[1] - values[0] if len(values) > 1 else 1.0

    if x_tick_labels:
        x_ticks = [{"pos": px(v), "label": str(x_tick_labels.get(v, x_tick_labels.get(int(v), v)))} for v in x_ticks_values]
    else:
        x_ticks = [{"pos": px(v), "label": fmt_tick(v, step_of(x_ticks_values))} for v in x_ticks_values]
    y_ticks = [{"pos": py(v), "label": fmt_tick(v, step_of(y_ticks_values))} for v in y_ticks_values if y0 - 1e-9 <= v <= y1 + 1e-9]
    laid = []
    for s in series:
        points = [[px(x), py(y)] for x, y in s["points"] if y is not None]
        kind = s.get("kind", "line")
        if kind == "both" and len(points) > MAX_CIRCLES:
            kind = "line"
        laid.append({"name": s["name"], "cls": s.get("cls", "s0"), "kind": kind, "n": len(points), "points": points})
    return {"width": width, "height": height, "title": title, "x_label": x_label, "y_label": y_label,
            "frame": {"left": left, "top": top, "right": right, "bottom": bottom},
            "x_ticks": x_ticks, "y_ticks": y_ticks, "series": laid, "empty": not any(s["n"] for s in laid)}


def path_d(points: list[list[float]]) -> str:
    """SVG path data: ``M x y`` then ``L x y`` for each further point."""
    return " ".join(f"{'M' if i == 0 else 'L'}{x} {y}" for i, (x, y) in enumerate(points))


def svg(spec: dict | None) -> Markup:
    """The chart as an inline ``<svg>`` (every text escaped)."""
    if not spec:
        return Markup("")
    w, h, f = spec["width"], spec["height"], spec["frame"]
    out = [f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{escape(spec["title"])}" '
           f'xmlns="http://www.w3.org/2000/svg">']
    out.append(f'<rect class="plot-bg" x="{f["left"]}" y="{f["top"]}" width="{f["right"] - f["left"]}" '
               f'height="{f["bottom"] - f["top"]}"/>')
    for t in spec["y_ticks"]:
        out.append(f'<line class="grid" x1="{f["left"]}" x2="{f["right"]}" y1="{t["pos"]}" y2="{t["pos"]}"/>')
        out.append(f'<text class="tick" x="{f["left"] - 6}" y="{t["pos"]}" text-anchor="end" dy="0.32em">'
                   f'{escape(t["label"])}</text>')
    for t in spec["x_ticks"]:
        out.append(f'<line class="tickmark" x1="{t["pos"]}" x2="{t["pos"]}" y1="{f["bottom"]}" y2="{f["bottom"] + 4}"/>')
        out.append(f'<text class="tick" x="{t["pos"]}" y="{f["bottom"] + 16}" text-anchor="middle">{escape(t["label"])}</text>')
    out.append(f'<line class="axis" x1="{f["left"]}" x2="{f["right"]}" y1="{f["bottom"]}" y2="{f["bottom"]}"/>')
    out.append(f'<line class="axis" x1="{f["left"]}" x2="{f["left"]}" y1="{f["top"]}" y2="{f["bottom"]}"/>')
    out.append(f'<text class="axis-label" x="{(f["left"] + f["right"]) / 2}" y="{h - 6}" text-anchor="middle">'
               f'{escape(spec["x_label"])}</text>')
    cy = (f["top"] + f["bottom"]) / 2
    out.append(f'<text class="axis-label" x="12" y="{cy}" text-anchor="middle" transform="rotate(-90 12 {cy})">'
               f'{escape(spec["y_label"])}</text>')
    for s in spec["series"]:
        cls = escape(s["cls"])
        out.append(f'<g class="series {cls}" data-name="{escape(s["name"])}" data-n="{s["n"]}">')
        if s["kind"] in ("line", "both") and s["points"]:
            out.append(f'<path class="line" d="{path_d(s["points"])}"/>')
        if s["kind"] in ("points", "both"):
            out.extend(f'<circle class="pt" cx="{x}" cy="{y}" r="3"/>' for x, y in s["points"])
        out.append("</g>")
    if spec["empty"]:
        out.append(f'<text class="empty" x="{(f["left"] + f["right"]) / 2}" y="{cy}" text-anchor="middle">no data yet</text>')
    out.append("</svg>")
    return Markup("".join(out))
