"""Chart of the training time lost per checkpoint, from the recorded GPU benchmark results (``bench_gpu.py --json``).

    python benchmarks/plot_stall.py                       # results/*-gpu.json -> docs/img/time_lost_per_checkpoint.svg
    python benchmarks/plot_stall.py results/h200-run1-gpu.json --out /tmp/chart.svg

Pure Python (no plotting library): one SVG with a panel per results file and a bar per variant (Lightning
``ModelCheckpoint``, Lightning + ``AsyncCheckpointIO``, DCP ``async_save``, lightning_ckpt), each split into

- the stalls during training: the sum over all steps of (step time - median step time), per save (``excess_s``);
- the extra wait at the end of ``fit`` (the last save's write), per save: ``end_of_fit_s`` minus that of the run
  without checkpoints when the file has one (``none``), else minus the smallest of the variants (run 1 had no run
  without checkpoints; Lightning's own end of ``fit`` is then the baseline), never below zero.

The machine, the checkpoint size and the source file are written into the chart.
"""
from __future__ import annotations

import argparse
import glob
import html
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = [  # (key in the results, label, color)
    ("lightning", "Lightning ModelCheckpoint", "#7f7f7f"),
    ("lightning_async", "Lightning + AsyncCheckpointIO", "#a6a6a6"),
    ("dcp_async", "DCP async_save (pinned staging)", "#4c78a8"),
    ("ours_async", "lightning_ckpt (async)", "#2ca02c"),
]
W, LABEL_W, RIGHT = 820, 250, 170
BAR_H, GAP = 22, 8


def lost_per_checkpoint(res: dict) -> tuple[dict[str, tuple[float, float]], str]:
    """{variant: (step stalls per save, extra end-of-fit wait per save)} and how the end-of-fit baseline was chosen."""
    v = res["variants"]
    if "none" in v:
        base, how = v["none"]["end_of_fit_s"], "end-of-fit wait counted beyond that of a run without checkpoints"
    else:
        name = min((k for k in v if k != "none"), key=lambda k: v[k]["end_of_fit_s"])
        base = v[name]["end_of_fit_s"]
        how = f"no run without checkpoints: end-of-fit wait counted beyond the fastest variant's ({name})"
    out = {}
    for key, _, _ in VARIANTS:
        if key in v:
            d = v[key]
            out[key] = (d["excess_s"] / d["saves"], max(0.0, d["end_of_fit_s"] - base) / d["saves"])
    return out, how


def _t(x: float, y: float, text: str, size: int = 12, anchor: str = "start", weight: str = "normal",
       fill: str = "#222") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'fill="{fill}">{html.escape(text)}</text>')


def render(results: list[tuple[str, dict]]) -> str:
    panels = [(path, res, *lost_per_checkpoint(res)) for path, res in results]
    top = max((a + b for _, _, lost, _ in panels for a, b in lost.values()), default=1.0)
    scale = (W - LABEL_W - RIGHT) / top
    body, y = [], 58
    body.append(_t(16, 26, "Training time lost per checkpoint (seconds, lower is better)", 17, weight="bold"))
    body.append(_t(16, 46, "Darker: stalls during training steps. Lighter: extra wait for the last save when fit ends.",
                   12, fill="#555"))
    for path, res, lost, how in panels:
        y += 14
        gb = res.get("state_gb", 0.0)
        body.append(_t(16, y + 12, f"{res.get('gpu', '?')}, {res.get('cpus', '?')} CPU cores: a {gb:.2f} GB "
                       f"checkpoint (weights + Adam state) every {res['every'] * res['step_s']:.1f} s of training", 13,
                       weight="bold"))
        body.append(_t(16, y + 28, f"{os.path.relpath(path, ROOT)}: torch {res.get('torch', '?')}, lightning "
                       f"{res.get('lightning', '?')}, disk {res.get('raw_write_fsync_gbps', 0):.2f} GB/s write+fsync",
                       11, fill="#555"))
        body.append(_t(16, y + 42, how, 11, fill="#666"))
        y += 54
        ref = sum(lost.get("lightning", (0.0, 0.0)))
        for key, label, color in VARIANTS:
            if key not in lost:
                continue
            stall, tail = lost[key]
            x0 = LABEL_W
            body.append(_t(LABEL_W - 8, y + BAR_H * 0.7, label, 13, anchor="end"))
            body.append(f'<rect x="{x0}" y="{y}" width="{max(stall * scale, 1):.1f}" height="{BAR_H}" fill="{color}">'
                        f"<title>{html.escape(label)}: step stalls {stall:.2f} s per save</title></rect>")
            if tail > 0:
                body.append(f'<rect x="{x0 + stall * scale:.1f}" y="{y}" width="{tail * scale:.1f}" height="{BAR_H}" '
                            f'fill="{color}" fill-opacity="0.45"><title>{html.escape(label)}: end-of-fit wait '
                            f"{tail:.2f} s per save</title></rect>")
            total = stall + tail
            note = f"{total:.2f} s" if total < 1 else f"{total:.1f} s"
            if ref and key != "lightning":
                note += f"  ({total / ref:.2f}x Lightning)"
            body.append(_t(x0 + total * scale + 6, y + BAR_H * 0.7, note, 12, weight="bold" if key == "ours_async"
                           else "normal"))
            y += BAR_H + GAP
        y += 6
    body.append(_t(16, y + 14, "Regenerate: python benchmarks/plot_stall.py (from the results JSON of "
                   "benchmarks/bench_gpu.py, run by benchmarks/gpu.sh)", 11, fill="#666"))
    h = y + 26
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" width="{W}" height="{h}" '
            'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" role="img" '
            'aria-label="Training time lost per checkpoint">'
            f'<rect width="{W}" height="{h}" fill="#fff"/>' + "".join(body) + "</svg>\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", help="results JSON files (default: benchmarks/results/*-gpu.json)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "time_lost_per_checkpoint.svg"))
    a = ap.parse_args()
    paths = [os.path.abspath(p) for p in a.results] or sorted(glob.glob(os.path.join(HERE, "results", "*-gpu.json")))
    if not paths:
        raise SystemExit("no results files found; run benchmarks/gpu.sh first or pass the JSON files")
    results = []
    for p in paths:
        with open(p) as f:
            results.append((p, json.load(f)))
    svg = render(results)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(svg)
    for path, res in results:
        lost, how = lost_per_checkpoint(res)
        print(f"{os.path.relpath(path, ROOT)} ({how}):")
        for key, label, _ in VARIANTS:
            if key in lost:
                stall, tail = lost[key]
                print(f"  {label:34s} {stall + tail:7.2f} s per save  (step stalls {stall:.2f}, end-of-fit {tail:.2f})")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
