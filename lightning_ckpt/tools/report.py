"""``lightning-ckpt report RUN``: one self-contained HTML page about a run folder (no network, no script).

It shows a table of the checkpoints (committed ones and, from ``<run>/metrics.jsonl``, the ones retention or best-k
deleted since), and inline SVG plots over the steps of every recorded metric, of the save stall and background write
time, and of the size of each checkpoint. Which checkpoints are kept (committed), pruned (in the history, no longer
committed) and best (tagged ``best``; the best of those by the monitored metric is starred) is marked in the table
and on the plots.

Everything is read through :func:`lightning_ckpt.read` (manifests only, nothing verified or loaded) and works for an
``s3://`` folder too. Every value taken from a manifest or the history is HTML-escaped; the page carries a
Content-Security-Policy that forbids scripts and any network access.
"""
from __future__ import annotations

import html
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import CheckpointError, CheckpointNotFoundError
from ..read import scan_checkpoints, open_checkpoint, read_state_doc
from ..folder.history import HISTORY, MAX_HISTORY_BYTES, MAX_STEP  # noqa: F401 - re-exported
from ..folder.history import read_history as _read_history
from ..store import LocalStore, open_store
from .report_svg import bar_chart, line_chart

MAX_METRIC_PLOTS = 24  # more metrics than this are listed in the table only
_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
              "-infinity": -math.inf}


def number(v: Any) -> Optional[float]:
    """A metric value as a float (NaN and +-inf included, also when stored as the strings "nan", "inf", "-inf"), or
    None when it is not a number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        try:
            return float(v)
        except OverflowError:  # an integer beyond the float range
            return math.inf if v > 0 else -math.inf
    if isinstance(v, float):
        return v
    if isinstance(v, str):
        return _NONFINITE.get(v.strip().lower())
    return None


@dataclass
class Row:
    """One checkpoint of the run: committed (``kept``) or only in the history (``pruned``)."""

    name: str
    step: int
    tags: list[str]
    metrics: dict[str, Any]
    kept: bool
    epoch: Any = None
    size_bytes: Optional[int] = None
    stall_s: Optional[float] = None
    write_s: Optional[float] = None
    time_unix: Optional[float] = None
    star: bool = False  # the best by the monitored metric among the kept best ones

    @property
    def best(self) -> bool:
        return "best" in self.tags

    @property
    def status(self) -> list[str]:
        return (["kept"] if self.kept else ["pruned"]) + (["best"] if self.best else []) + (["star"] if self.star else [])


@dataclass
class RunReport:
    """What the page shows (see :func:`collect_run`)."""

    where: str
    rows: list[Row]
    monitor: Optional[str] = None
    mode: str = "min"
    monitor_source: str = ""
    history_found: bool = False
    history_bad_lines: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    newest: dict = field(default_factory=dict)  # the newest committed checkpoint's manifest

    @property
    def kept(self) -> list[Row]:
        return [r for r in self.rows if r.kept]

    @property
    def pruned(self) -> list[Row]:
        return [r for r in self.rows if not r.kept]


def _seconds(t: Any, key: str) -> Optional[float]:
    v = t.get(key) if isinstance(t, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _monitor_from_state(path: str) -> Optional[tuple[str, str, str]]:
    """(monitor, mode, who) recorded by a BestMetricCheckpoint / EarlyStopAndSave in a checkpoint's state."""
    try:
        ck = open_checkpoint(path)
        doc = read_state_doc(ck.folder, ck.m)
    except (CheckpointError, OSError, ValueError):
        return None
    callbacks = doc.get("callbacks") if isinstance(doc, dict) else None
    if not isinstance(callbacks, dict):
        return None
    found = []
    for key, st in callbacks.items():
        if isinstance(st, dict) and isinstance(st.get("monitor"), str) and st.get("mode") in ("min", "max"):
            who = str(key).split("{")[0]
            found.append((who != "BestMetricCheckpoint", st["monitor"], st["mode"], who))
    if not found:
        return None
    _, monitor, mode, who = min(found)
    return monitor, mode, who


def collect_run(run_folder: Any, *, monitor: Optional[str] = None, mode: Optional[str] = None) -> RunReport:
    """Read what the report shows from a run folder (or ``s3://bucket/prefix``): the committed checkpoints' manifests,
    the run's ``metrics.jsonl`` history, and which metric the best checkpoints were chosen by (``monitor``/``mode``
    if given, else read from the saving callbacks' state in the newest best checkpoint).

    Raises:
        CheckpointNotFoundError: a local ``run_folder`` that does not exist (or is a file).
    """
    if mode not in (None, "min", "max"):
        raise ValueError(f"mode={mode!r} is invalid; use 'min' or 'max'")
    store = open_store(run_folder)
    if not store.exists():  # a local folder that is not there (a remote location always is)
        raise CheckpointNotFoundError(f"{run_folder} is not a folder")
    infos, skipped = scan_checkpoints(run_folder)
    rows: list[Row] = []
    for c in infos:
        t = c.summary.get("timings")
        created = c.created_unix if isinstance(c.created_unix, (int, float)) and math.isfinite(c.created_unix) else None
        rows.append(Row(c.name, c.step, list(c.tags), dict(c.metrics), True, c.epoch, c.size_bytes,
                        _seconds(t, "snapshot_s"), _seconds(t, "write_s"), created))
    history, bad = _read_history(store)
    current = {r.name for r in rows}
    last_of_name: dict[str, int] = {}
    for i, d in enumerate(history or []):
        last_of_name[d["name"]] = i
    for i, d in enumerate(history or []):
        # the last line of a committed name is that checkpoint; earlier lines of the same name were deleted and
        # written again (a resume from an earlier step)
        if d["name"] in current and last_of_name[d["name"]] == i:
            continue
        tags = [str(x) for x in d.get("tags")] if isinstance(d.get("tags"), list) else []
        metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
        when = number(d.get("time")) if not isinstance(d.get("time"), str) else None
        when = when if when is not None and math.isfinite(when) else None
        rows.append(Row(d["name"], d["step"], tags, dict(metrics), False, time_unix=when))
    rows.sort(key=lambda r: (r.step, r.time_unix or 0.0, r.name))
    rep = RunReport(store.uri, rows, history_found=history is not None, history_bad_lines=bad,
                    unreadable=[(p, str(e)) for p, e in skipped], newest=infos[-1].summary if infos else {})
    best_kept = [c for c in infos if "best" in c.tags]
    if monitor is not None:
        rep.monitor, rep.mode, rep.monitor_source = monitor, mode or "min", "given"
    elif best_kept:
        got = _monitor_from_state(best_kept[-1].path)
        if got is not None:
            rep.monitor, rep.mode, rep.monitor_source = got[0], mode or got[1], f"{got[2]} in {best_kept[-1].name}"
    if rep.monitor is not None:
        scored = [(number(r.metrics.get(rep.monitor)), r) for r in rep.kept if r.best]
        scored = [(v, r) for v, r in scored if v is not None and math.isfinite(v)]
        if scored:
            pick = min if rep.mode == "min" else max
            pick(scored, key=lambda vr: (vr[0], -vr[1].step))[1].star = True
    return rep


# ------------------------------------------------------------------------------------------------ rendering
def esc(x: Any, limit: int = 300) -> str:
    s = str(x)
    return html.escape(s if len(s) <= limit else s[:limit] + "...", quote=True)


def _fmt(v: Any) -> str:
    n = number(v)
    if n is not None and not (isinstance(v, int) and not isinstance(v, bool)):
        return f"{n:.4g}" if math.isfinite(n) else str(n)
    return str(v)


def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _when(t: Optional[float], now: float) -> tuple[str, str]:
    if t is None:
        return "?", ""
    s = max(0.0, now - t)
    age = next((f"{s / d:.0f}{u} ago" for u, d in (("d", 86400), ("h", 3600), ("m", 60)) if s >= d), f"{s:.0f}s ago")
    try:
        return age, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return age, ""


def _status_text(r: Row, rep: RunReport) -> str:
    if not r.kept:
        return "pruned"
    return "kept" + (", best" if r.best else "") + (f" \u2605 (best {rep.monitor})" if r.star else "")


def _metric_names(rep: RunReport) -> list[str]:
    names = sorted({str(k) for r in rep.rows for k in r.metrics})
    if rep.monitor in names:
        names.remove(rep.monitor)
        names.insert(0, rep.monitor)
    return names


def _plots(rep: RunReport, metrics: list[str]) -> list[str]:
    out = []
    for name in metrics[:MAX_METRIC_PLOTS]:
        pts = []
        for r in rep.rows:
            if name in r.metrics and number(r.metrics[name]) is not None:
                pts.append((r.step, number(r.metrics[name]), r.status, f"{r.name} (step {r.step}): {name} = "
                            f"{_fmt(r.metrics[name])}, {_status_text(r, rep)}"))
        title = name + (f" (monitored, {rep.mode})" if name == rep.monitor else "")
        out.append(line_chart(f"metric:{name}", title, pts, esc))
    kept = rep.kept
    labels = [f"{r.name} (step {r.step})" for r in kept]
    out.append(bar_chart("stall", "Save time per checkpoint (s)", [r.step for r in kept],
                         [("stall (training blocked)", [r.stall_s for r in kept]),
                          ("background write", [r.write_s for r in kept])], labels, esc, lambda v: f"{v:.3g}s"))
    out.append(bar_chart("size", "Size per checkpoint", [r.step for r in kept],
                         [("size", [None if r.size_bytes is None else float(r.size_bytes) for r in kept])], labels,
                         esc, _bytes))
    return out


CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1240px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}code{background:#f3f3f3;padding:0 .25em}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;
vertical-align:top}th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.pruned td{color:#999}tr.star td{background:#fff6d5}.plots{display:flex;flex-wrap:wrap;gap:1em}
svg.plot{width:580px;max-width:100%;height:auto;border:1px solid #eee;background:#fff}.note{color:#666}
.tag{display:inline-block;border:1px solid #ccc;border-radius:3px;padding:0 .3em;margin:0 .15em;font-size:12px}"""


def render_report(rep: RunReport, now: Optional[float] = None) -> str:
    """The HTML page of a :class:`RunReport` (a string, self-contained)."""
    now = time.time() if now is None else now
    metrics = _metric_names(rep)
    shown = metrics[:8]
    more = metrics[8:]
    p = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
         "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
         f"<title>lightning-ckpt report: {esc(rep.where)}</title><style>{CSS}</style></head><body>",
         f"<h1>Checkpoints of <code>{esc(rep.where, 1000)}</code></h1>",
         f'<p id="summary">{len(rep.kept)} kept ({esc(_bytes(sum(r.size_bytes or 0 for r in rep.kept)))}), '
         f"{len(rep.pruned)} pruned, {sum(r.best for r in rep.kept)} of the kept tagged best. "
         f'<span class="note">Written {esc(_when(now, now)[1])} by <code>lightning-ckpt report</code>.</span></p>']
    if rep.monitor:
        src = "given" if rep.monitor_source == "given" else f"from {esc(rep.monitor_source)}"
        p.append(f"<p>Best by <code>{esc(rep.monitor)}</code> ({esc(rep.mode)}; {src}): \u2605 marks the best kept "
                 "checkpoint tagged <code>best</code>.</p>")
    if not rep.history_found:
        p.append(f'<p class="note">No <code>{HISTORY}</code> in this folder: deleted (pruned) checkpoints are not '
                 "known, only the committed ones are shown.</p>")
    elif rep.history_bad_lines:
        p.append(f'<p class="note">{rep.history_bad_lines} malformed line(s) of {HISTORY} ignored.</p>')
    for path, err in rep.unreadable:
        p.append(f'<p class="note">Unreadable, not shown: <code>{esc(path)}</code>: {esc(err)}</p>')
    if not rep.rows:
        p.append('<p id="empty">No checkpoints in this folder yet.</p>')
    p.append('<h2>Plots</h2><p class="note">Over the steps: filled dots are kept checkpoints, hollow grey ones '
             "pruned, a gold ring marks <code>best</code>, a star the best by the monitored metric; red triangles at "
             "the top mark NaN/inf values. Hover for details.</p>")
    p.append('<div class="plots">' + "".join(_plots(rep, metrics)) + "</div>")
    if len(metrics) > MAX_METRIC_PLOTS:
        p.append(f'<p class="note">{len(metrics) - MAX_METRIC_PLOTS} more metrics are in the table only.</p>')
    p.append('<h2>Checkpoints</h2><table id="checkpoints"><thead><tr><th>status</th><th>name</th><th>step</th>'
             "<th>epoch</th><th>tags</th>" + "".join(f"<th>{esc(m)}</th>" for m in shown)
             + ("<th>more metrics</th>" if more else "")
             + "<th>size</th><th>stall</th><th>write</th><th>age</th></tr></thead><tbody>")
    for r in rep.rows:
        age, stamp = _when(r.time_unix, now)
        cells = [esc(_status_text(r, rep)), f"<code>{esc(r.name)}</code>", str(int(r.step)), esc(r.epoch if r.epoch
                 is not None else ""), "".join(f'<span class="tag">{esc(t)}</span>' for t in r.tags)]
        cells += [esc(_fmt(r.metrics[m])) if m in r.metrics else "" for m in shown]
        if more:
            cells.append(esc(" ".join(f"{k}={_fmt(r.metrics[k])}" for k in more if k in r.metrics), 2000))
        cells += [esc(_bytes(r.size_bytes)) if r.kept else "",
                  "" if r.stall_s is None else f"{r.stall_s:.3f}s", "" if r.write_s is None else f"{r.write_s:.3f}s",
                  f'<span title="{esc(stamp)}">{esc(age)}</span>']
        cls = " ".join(r.status)
        p.append(f'<tr class="{cls}" data-name="{esc(r.name)}" data-step="{int(r.step)}" data-status="{cls}">'
                 + "".join(f'<td class="n">{c}</td>' if i in (2, 3) else f"<td>{c}</td>" for i, c in enumerate(cells))
                 + "</tr>")
    p.append("</tbody></table>")
    m = rep.newest
    run = m.get("run") if isinstance(m.get("run"), dict) else {}
    if run or m.get("hparams"):
        versions = run.get("versions") if isinstance(run.get("versions"), dict) else {}
        p.append("<h2>Run</h2><ul>"
                 f"<li>newest checkpoint written on <code>{esc(run.get('host', '?'))}</code>, git commit "
                 f"<code>{esc(run.get('git_commit') or '-')}</code>, run id <code>{esc(m.get('run_id', '-'))}</code></li>"
                 f"<li>versions: {esc(', '.join(f'{k} {v}' for k, v in versions.items()), 1000)}</li>")
        if isinstance(m.get("hparams"), dict):
            p.append(f"<li>hparams: <code>{esc(', '.join(f'{k}={v}' for k, v in m['hparams'].items()), 2000)}</code></li>")
        p.append("</ul>")
    p.append("</body></html>\n")
    return "\n".join(p)


def default_output(run_folder: Any) -> str:
    """``<run>/report.html`` for a local folder; ``./<last part of the prefix>-report.html`` for an S3 one."""
    where = os.fspath(run_folder) if isinstance(run_folder, (str, os.PathLike)) else str(run_folder)
    if os.path.isdir(where):  # a folder of this machine holds its report (a listed run folder always exists)
        return os.path.join(os.path.abspath(where), "report.html")
    base = str(where).rstrip("/").rsplit("/", 1)[-1] or "run"
    return os.path.abspath(f"{base}-report.html")


def save_html(page: str, out_html: Any) -> str:
    """Write ``page`` to ``out_html`` (a file, or a folder to write ``report.html`` in) atomically: readers see the old
    or the new page. Returns the absolute path written."""
    out = os.path.abspath(os.fspath(out_html))
    if os.path.isdir(out):
        out = os.path.join(out, "report.html")
    LocalStore(os.path.dirname(out)).write_atomic(os.path.basename(out), page.encode("utf-8"))
    return out


def write_report(run_folder: Any, out_html: Any = None, *, monitor: Optional[str] = None,
                 mode: Optional[str] = None) -> str:
    """Write the HTML report of ``run_folder`` (a folder or ``s3://bucket/prefix``) to ``out_html`` (default:
    :func:`default_output`) and return the path written. See :func:`collect_run` for ``monitor``/``mode``."""
    page = render_report(collect_run(run_folder, monitor=monitor, mode=mode))
    return save_html(page, out_html if out_html is not None else default_output(run_folder))
