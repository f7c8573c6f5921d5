"""Line charts as SVG, in pure Python (no plotting library on the benchmark machines): log-scaled axes, one panel per
measure, one line per variant. Used by ``bench_scale.py`` to draw its curves into ``docs/img/``.

    svg = chart([{"title": ..., "xlabel": ..., "ylabel": ..., "series": {"label": [(x, y), ...]}}], caption="...")
"""
from __future__ import annotations

import html
import math

COLORS = ["#2ca02c", "#4c78a8", "#f58518", "#7f7f7f", "#e45756", "#b279a2", "#9d755d", "#17becf"]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_B, MARGIN_T, LEGEND_W = 420, 260, 62, 42, 30, 190


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0 ** k for k in range(a, b + 1)]


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _panel(p: dict, ox: float, oy: float) -> list[str]:
    pts = [(x, y) for s in p["series"].values() for x, y in s if x > 0 and y > 0]
    if not pts:
        return []
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    xt, yt = _log_ticks(min(xs), max(xs)), _log_ticks(min(ys), max(ys))
    lx0, lx1 = math.log10(xt[0]), math.log10(xt[-1])
    ly0, ly1 = math.log10(yt[0]), math.log10(yt[-1])
    pw, ph = PANEL_W - MARGIN_L - 10, PANEL_H - MARGIN_B - MARGIN_T

    def px(x: float) -> float:
        return ox + MARGIN_L + (math.log10(x) - lx0) / max(lx1 - lx0, 1e-9) * pw

    def py(y: float) -> float:
        return oy + MARGIN_T + ph - (math.log10(y) - ly0) / max(ly1 - ly0, 1e-9) * ph

    out = [f'<text x="{ox + MARGIN_L}" y="{oy + 18}" font-weight="bold">{html.escape(p["title"])}</text>',
           f'<rect x="{ox + MARGIN_L}" y="{oy + MARGIN_T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in xt:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{oy + MARGIN_T}" x2="{x:.1f}" y2="{oy + MARGIN_T + ph}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{oy + MARGIN_T + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for t in yt:
        y = py(t)
        out.append(f'<line x1="{ox + MARGIN_L}" y1="{y:.1f}" x2="{ox + MARGIN_L + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ox + MARGIN_L - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<text x="{ox + MARGIN_L + pw / 2}" y="{oy + PANEL_H - 8}" text-anchor="middle">'
               f'{html.escape(p["xlabel"])}</text>')
    out.append(f'<text transform="translate({ox + 14},{oy + MARGIN_T + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(p["ylabel"])}</text>')
    for i, (label, s) in enumerate(p["series"].items()):
        s = sorted((x, y) for x, y in s if x > 0 and y > 0)
        if not s:
            continue
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>' for x, y in s)
    return out


def chart(panels: list[dict], caption: str = "", cols: int = 2) -> str:
    """An SVG document with the panels on a grid of ``cols`` columns and one legend per panel beside it."""
    rows = math.ceil(len(panels) / cols)
    width, height = cols * (PANEL_W + LEGEND_W), rows * PANEL_H + (30 if caption else 0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for i, p in enumerate(panels):
        ox, oy = (i % cols) * (PANEL_W + LEGEND_W), (i // cols) * PANEL_H
        out.extend(_panel(p, ox, oy))
        for j, label in enumerate(p["series"]):
            y = oy + MARGIN_T + 10 + j * 16
            c = COLORS[j % len(COLORS)]
            out.append(f'<line x1="{ox + PANEL_W}" y1="{y - 4}" x2="{ox + PANEL_W + 16}" y2="{y - 4}" stroke="{c}" '
                       f'stroke-width="2"/><text x="{ox + PANEL_W + 20}" y="{y}">{html.escape(label)}</text>')
    if caption:
        out.append(f'<text x="8" y="{height - 10}">{html.escape(caption)}</text>')
    out.append("</svg>")
    return "\n".join(out)
