"""Inline SVG plots for ``lightning-ckpt report`` (``tools/report.py``): a metric over the steps and per-checkpoint
bars. Pure string building: no plotting library, no script; every label goes through the caller's escape function.
Coordinates stay finite whatever the values (NaN, +-inf, 1e308) are."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

W, H = 600, 250
LEFT, RIGHT, TOP, BOTTOM = 68, 14, 34, 40
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
GOLD, PRUNED, BAD = "#d4a017", "#9a9a9a", "#d62728"

Esc = Callable[[object], str]


def _pos(v: float, lo: float, hi: float, a: float, b: float) -> float:
    """``v`` in [lo, hi] mapped to [a, b], clamped; halves first so that no difference overflows."""
    v = min(v, 1 << 62) if isinstance(v, int) else v  # a huge step: float(v) would overflow
    span = hi / 2 - lo / 2
    t = (v / 2 - lo / 2) / span if span > 0 else 0.5
    t = 0.0 if not math.isfinite(t) else min(1.0, max(0.0, t))
    return round(a + t * (b - a), 2)


def ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` round values (1, 2, 2.5, 5 x 10^k apart) between ``lo`` and ``hi``."""
    span = hi / 2 - lo / 2
    if not (span > 0 and math.isfinite(span)):
        return [lo] if lo == hi else [lo, hi]
    raw = 2 * span / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first, last = math.ceil(lo / step), math.floor(hi / step)
    if last - first > 50:  # float trouble at extreme values
        return [lo, hi]
    return [k * step for k in range(first, last + 1)]


def _range(values: Sequence[float], from_zero: bool = False) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if from_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi / 2 - lo / 2) * 0.16
    return (lo if from_zero and lo == 0 else lo - pad), hi + pad


def _frame(plot_id: str, title: str, esc: Esc, yt: list[float], ylo: float, yhi: float, yfmt: Callable) -> list[str]:
    out = [f'<svg class="plot" data-plot="{esc(plot_id)}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" '
           f'width="{W}" height="{H}" role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>',
           f'<text x="{LEFT}" y="20" font-size="14" font-weight="600" fill="#222">{esc(title, 90)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#bbb"/>']
    for v in yt:
        y = _pos(v, ylo, yhi, H - BOTTOM, TOP)
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y}" y2="{y}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4}" font-size="11" text-anchor="end" fill="#555">{esc(yfmt(v))}</text>')
    return out


def _xlabel(text: str, esc: Esc) -> str:
    return f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" font-size="12" text-anchor="middle" fill="#555">{esc(text)}</text>'


def _empty(out: list[str], esc: Esc, what: str) -> str:
    out.append(f'<text x="{W / 2}" y="{H / 2}" font-size="13" text-anchor="middle" fill="#888">{esc(what)}</text></svg>')
    return "".join(out)


def _star(x: float, y: float, r: float = 8.0) -> str:
    pts = []
    for i in range(10):
        a = math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.45
        pts.append(f"{x + rr * math.cos(a):.2f},{y - rr * math.sin(a):.2f}")
    return " ".join(pts)


def line_chart(plot_id: str, title: str, points: Sequence[tuple[int, float, list[str], str]], esc: Esc) -> str:
    """A metric over the steps: ``points`` are (step, value, status, tooltip); status holds "kept" or "pruned", and
    maybe "best" and "star". Non-finite values are drawn as red triangles along the top edge."""
    finite = [p for p in points if math.isfinite(p[1])]
    ylo, yhi = _range([p[1] for p in finite]) if finite else (0.0, 1.0)
    out = _frame(plot_id, title, esc, ticks(ylo, yhi) if finite else [], ylo, yhi, lambda v: f"{v:.4g}")
    if not points:
        return _empty(out, esc, "no values recorded")
    xs = [float(min(p[0], 1 << 62)) for p in points]
    xlo, xhi = min(xs), max(xs)
    if xlo == xhi:
        xlo, xhi = xlo - 1, xhi + 1
    pad = (xhi - xlo) * 0.03
    xlo, xhi = xlo - pad, xhi + pad

    def X(v: float) -> float:
        return _pos(v, xlo, xhi, LEFT, W - RIGHT)

    def Y(v: float) -> float:
        return _pos(v, ylo, yhi, H - BOTTOM, TOP)

    for v in ticks(xlo, xhi, 6, integer=True):
        out.append(f'<text x="{X(v)}" y="{H - BOTTOM + 15}" font-size="11" text-anchor="middle" fill="#555">{v:.0f}</text>')
    out.append(_xlabel("step", esc))
    line = " ".join(f"{X(p[0])},{Y(p[1])}" for p in sorted(finite, key=lambda p: p[0]))
    if len(finite) > 1:
        out.append(f'<polyline class="series" points="{line}" fill="none" stroke="{COLORS[0]}" stroke-width="1.5"/>')
    for step, value, status, tip in points:
        x = X(step)
        cls = esc(" ".join(["pt"] + list(status)))
        t = f"<title>{esc(tip)}</title>"
        if not math.isfinite(value):
            out.append(f'<path class="{cls} nonfinite" d="M{x - 5},{TOP + 2}L{x + 5},{TOP + 2}L{x},{TOP + 11}Z" '
                       f'fill="{BAD}">{t}</path>')
            continue
        y = Y(value)
        if "best" in status:
            out.append(f'<circle cx="{x}" cy="{y}" r="6.5" fill="none" stroke="{GOLD}" stroke-width="2"/>')
        if "star" in status:
            out.append(f'<polygon class="{cls}" points="{_star(x, y - 14)}" fill="{GOLD}">{t}</polygon>')
        if "kept" in status:
            out.append(f'<circle class="{cls}" cx="{x}" cy="{y}" r="3.5" fill="{COLORS[0]}">{t}</circle>')
        else:
            out.append(f'<circle class="{cls}" cx="{x}" cy="{y}" r="3" fill="#fff" stroke="{PRUNED}" '
                       f'stroke-width="1.5">{t}</circle>')
    return "".join(out) + "</svg>"


def bar_chart(plot_id: str, title: str, steps: Sequence[int], series: Sequence[tuple[str, Sequence[Optional[float]]]],
              labels: Sequence[str], esc: Esc, fmt: Callable[[float], str]) -> str:
    """Bars per checkpoint (one group per entry of ``steps``, one bar per series; None: no bar)."""
    values = [v for _, vs in series for v in vs if v is not None and math.isfinite(v)]
    ylo, yhi = _range(values, from_zero=True) if values else (0.0, 1.0)
    out = _frame(plot_id, title, esc, ticks(ylo, yhi) if values else [], ylo, yhi, fmt)
    if not values:
        return _empty(out, esc, "nothing recorded")
    n, k = len(steps), len(series)
    gw = (W - LEFT - RIGHT) / n
    bw = max(1.0, gw * 0.8 / k)
    every = max(1, math.ceil(n / 8))
    base = _pos(0.0, ylo, yhi, H - BOTTOM, TOP)
    for i, step in enumerate(steps):
        x0 = LEFT + i * gw + gw * 0.1
        if i % every == 0:
            out.append(f'<text x="{round(LEFT + (i + 0.5) * gw, 2)}" y="{H - BOTTOM + 15}" font-size="11" '
                       f'text-anchor="middle" fill="#555">{int(step)}</text>')
        for j, (name, vs) in enumerate(series):
            v = vs[i]
            if v is None or not math.isfinite(v):
                continue
            y = _pos(v, ylo, yhi, H - BOTTOM, TOP)
            top, h = min(y, base), max(abs(base - y), 0.5)
            out.append(f'<rect class="bar" x="{round(x0 + j * bw, 2)}" y="{top}" width="{round(bw, 2)}" '
                       f'height="{round(h, 2)}" fill="{COLORS[j % len(COLORS)]}"><title>{esc(labels[i])}: '
                       f'{esc(name)} {esc(fmt(v))}</title></rect>')
    if k > 1:
        for j, (name, _) in enumerate(series):
            x = W - RIGHT - 300 + j * 160
            out.append(f'<rect x="{x}" y="10" width="10" height="10" fill="{COLORS[j % len(COLORS)]}"/>'
                       f'<text x="{x + 14}" y="19" font-size="11" fill="#333">{esc(name, 40)}</text>')
    out.append(_xlabel("step", esc))
    return "".join(out) + "</svg>"
