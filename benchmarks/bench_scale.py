#!/usr/bin/env python
"""Scaling benchmark (issue 22): how a save, a load and a folder's tools behave as the work grows.

Two halves, each its own module so either can be run alone:

- ``_scale_tensors.py``: a 64 MB state split into N = 10 ... 50,000 float32 tensors; our durable save, our load and the
  async training stall against ``safetensors``, ``torch.save``/``torch.load``, ``dcp.save`` and one bulk copy of the
  same bytes, in the same run;
- ``_scale_folders.py``: folders of 10 ... 3,000 checkpoints (local) and 10 ... 1,000 (S3, a SeaweedFS it starts):
  ``latest_checkpoint`` (time, manifests read, S3 requests), listing, ``ls``, ``lineage``, ``report``, and the
  callbacks' added time per save in a real ``fit``.

    python benchmarks/bench_scale.py                     # both halves, results/scale-*-cpu.json, the chart
    python benchmarks/bench_scale.py --plot-only         # redraw docs/img/scaling.svg from the recorded results

The chart (``docs/img/scaling.svg``, shown in ``docs/benchmarks.md``) is drawn from the results files, so a rerun of
one half redraws with the other half's last figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import svgplot  # noqa: E402

RESULTS = os.path.join(HERE, "results")
TENSORS = os.path.join(RESULTS, "scale-tensors-cpu.json")
FOLDERS = os.path.join(RESULTS, "scale-folders-cpu.json")
CHART = os.path.join(os.path.dirname(HERE), "docs", "img", "scaling.svg")


def panels(tensors: dict, folders: dict) -> list[dict]:
    rows = tensors.get("rows", [])

    def col(key: str) -> list[tuple[float, float]]:
        return [(r["tensors"], r[key]) for r in rows if r.get(key)]

    out = [
        {"title": "Save of 64 MB in N tensors", "xlabel": "tensors", "ylabel": "seconds",
         "series": {"lightning_ckpt (durable)": col("ours_save_s"), "safetensors + fsync": col("safetensors_save_s"),
                    "torch.save + fsync": col("torch_save_s"), "dcp.save": col("dcp_save_s")}},
        {"title": "Load of 64 MB in N tensors", "xlabel": "tensors", "ylabel": "seconds",
         "series": {"lightning_ckpt (verified)": col("ours_load_s"), "safetensors.load_file": col("safetensors_load_s"),
                    "torch.load": col("torch_load_s")}},
        {"title": "Training stall of an async save", "xlabel": "tensors", "ylabel": "seconds",
         "series": {"lightning_ckpt save()": col("stall_s"), "one copy of the bytes": col("one_copy_s")}},
    ]
    local, s3 = folders.get("local", {}), folders.get("s3", {})

    def fcol(rows: dict, key: str) -> list[tuple[float, float]]:
        return [(int(n), r[key]) for n, r in rows.items() if r.get(key)]

    out.append({"title": "Newest checkpoint of a folder", "xlabel": "checkpoints in the folder", "ylabel": "seconds",
                "series": {"latest_checkpoint (local)": fcol(local, "latest_s"),
                           "reading every manifest (local)": fcol(local, "latest_no_index_s"),
                           "latest_checkpoint (S3)": fcol(s3, "latest_s")}})
    out.append({"title": "Tools on a folder", "xlabel": "checkpoints in the folder", "ylabel": "seconds",
                "series": {"ls": fcol(local, "ls_s"), "lineage": fcol(local, "lineage_s"),
                           "report": fcol(local, "report_s"), "list (S3, cold)": fcol(s3, "list_cold_s")}})
    out.append({"title": "Callbacks' added time per save", "xlabel": "checkpoints in the folder", "ylabel": "seconds",
                "series": {"local (CPU)": fcol(local, "added_per_save_s"),
                           "S3 (CPU, the uploads included)": fcol(s3, "added_per_save_s")}})
    return out


def draw(out: str = CHART) -> str:
    with open(TENSORS) as f:
        tensors = json.load(f)
    with open(FOLDERS) as f:
        folders = json.load(f)
    svg = svgplot.chart(panels(tensors, folders), cols=2,
                        caption="2-core CPU machine; log-log; results/scale-tensors-cpu.json, results/scale-folders-cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(svg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plot-only", action="store_true", help="only redraw the chart from the recorded results")
    p.add_argument("--no-tensors", action="store_true", help="skip the tensor-count half")
    p.add_argument("--no-folders", action="store_true", help="skip the folder-size half")
    p.add_argument("--no-s3", action="store_true", help="folders: local only")
    p.add_argument("--out", default=CHART)
    args = p.parse_args(argv)
    if not args.plot_only:
        import _scale_folders
        import _scale_tensors

        if not args.no_tensors:
            _scale_tensors.main([])
        if not args.no_folders:
            _scale_folders.main(["--no-s3"] if args.no_s3 else [])
    print(f"wrote {draw(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
