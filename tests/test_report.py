"""`lightning-ckpt report`: the HTML page of a run, read back with html.parser and rendered in headless Chromium."""
from __future__ import annotations

import json
import math
import os
import sys
from html.parser import HTMLParser

import lightning.pytorch as pl
import pytest
import torch

from lightning_ckpt import BestMetricCheckpoint, CheckpointWriter, PeriodicCheckpoint, RetentionPolicy, list_checkpoints
from lightning_ckpt.cli import main
from lightning_ckpt.demo import DemoDataModule, DemoModel
from lightning_ckpt.tools.report import collect_run, write_report

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BUCKET = "reports"  # the s3 fixture's bucket (test_report_of_an_s3_folder, on the session's S3 server)
ODD = "odd<script>alert(1)</script>\"'&"  # a metric name that must come out as text


class OddModel(DemoModel):
    """The demo model, also logging a metric with a hostile name and a NaN metric."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log(ODD, float(self.global_step))
        self.log("sometimes_nan", float("nan") if (self.global_step + 1) % 20 == 0 else 1.0)
        return loss


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real Lightning run: periodic saves every 10 steps, the best 2 by val_loss, retention keeping the last 2."""
    d = str(tmp_path_factory.mktemp("report") / "run")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=60, val_check_interval=10, check_val_every_n_epoch=None, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PeriodicCheckpoint(d, every_n_train_steps=10), BestMetricCheckpoint(d, monitor="val_loss", top_k=2),
                   RetentionPolicy(d, keep_last=2)])
    trainer.fit(OddModel(), DemoDataModule(n_train=256, batch_size=32))
    return d


class Page(HTMLParser):
    """Table rows (data-name -> status), SVG plots (data-plot -> element counts), every tag and attribute seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, set[str]] = {}
        self.plots: dict[str, dict[str, int]] = {}
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []
        self.headers: list[str] = []
        self._plot: str | None = None
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs += [(k, v or "") for k, v in attrs]
        if tag == "tr" and "data-name" in a:
            self.rows[a["data-name"]] = set(a["data-status"].split())
        if tag == "svg" and "plot" in (a.get("class") or "").split():
            self._plot = a["data-plot"]
            self.plots[self._plot] = {}
        elif self._plot is not None:
            key = tag + "".join(f".{c}" for c in (a.get("class") or "").split() if c in ("pt", "kept", "pruned",
                                                                                          "best", "star", "bar", "nonfinite"))
            self.plots[self._plot][key] = self.plots[self._plot].get(key, 0) + 1
        self._in_th = tag == "th"

    def handle_endtag(self, tag):
        if tag == "svg":
            self._plot = None
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.headers.append(data)


def parse(path: str) -> Page:
    page = Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    return page


def expected_statuses(d: str) -> tuple[dict[str, set[str]], str]:
    """From the folder itself: kept = committed, pruned = in metrics.jsonl only, best = tagged; the star goes to the
    kept best one with the lowest val_loss."""
    kept = {c.name: c for c in list_checkpoints(d)}
    want = {n: {"kept"} | ({"best"} if "best" in c.tags else set()) for n, c in kept.items()}
    with open(os.path.join(d, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["name"] not in kept:
                want[rec["name"]] = {"pruned"} | ({"best"} if "best" in rec["tags"] else set())
    star = min((c for c in kept.values() if "best" in c.tags), key=lambda c: c.metrics["val_loss"]).name
    want[star].add("star")
    return want, star


def test_report_of_a_real_run_marks_best_kept_and_pruned(run_dir, capsys):
    assert main(["report", run_dir]) == 0
    out = os.path.join(run_dir, "report.html")
    assert capsys.readouterr().out.startswith(f"wrote {out}")
    want, star = expected_statuses(run_dir)
    assert any("pruned" in s for s in want.values()), "retention should have pruned some checkpoints"
    page = parse(out)
    assert page.rows == want
    # one plot per recorded metric, the save stall and the size
    metrics = {"train_loss", "val_loss", ODD, "sometimes_nan"}
    assert set(page.plots) == {f"metric:{m}" for m in metrics} | {"stall", "size"}
    vl = page.plots["metric:val_loss"]
    assert vl.get("circle.pt.kept.best", 0) + vl.get("circle.pt.kept", 0) + vl.get("circle.pt.kept.best.star", 0) \
        == sum("kept" in s for s in want.values())
    assert vl.get("circle.pt.pruned", 0) + vl.get("circle.pt.pruned.best", 0) == sum("pruned" in s for s in want.values())
    assert vl.get("polygon.pt.kept.best.star") == 1
    nonfinite = {k: n for k, n in page.plots["metric:sometimes_nan"].items() if k.endswith(".nonfinite")}
    assert sum(n for k, n in nonfinite.items() if ".kept" in k) == 1  # step 60 (saved after a NaN was logged)
    assert sum(nonfinite.values()) == 3  # steps 20, 40 (pruned) and 60
    assert page.plots["stall"].get("rect.bar", 0) >= len([s for s in want.values() if "kept" in s])
    assert page.plots["size"].get("rect.bar") == len([s for s in want.values() if "kept" in s])
    # the hostile metric name is text, never markup; nothing on the page can run or fetch anything
    assert ODD in page.headers
    assert "script" not in page.tags and "img" not in page.tags and "iframe" not in page.tags
    assert not [k for k, _ in page.attrs if k.startswith("on") or k in ("src", "href")]
    html = open(out, encoding="utf-8").read()
    assert "default-src 'none'" in html
    assert "<script" not in html and "https://" not in html
    assert collect_run(run_dir).monitor == "val_loss"


def _browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the report test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run does it)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_report_renders_in_headless_chromium_without_errors(run_dir, tmp_path):
    from selenium.webdriver.common.by import By

    out = write_report(run_dir, str(tmp_path / "r.html"))
    want, _ = expected_statuses(run_dir)
    driver = _browser()
    try:
        driver.get("file://" + out)
        assert driver.title.startswith("lightning-ckpt report")
        plots = driver.find_elements(By.CSS_SELECTOR, "svg.plot")
        assert len(plots) == 6
        for p in plots:
            assert p.size["width"] > 100 and p.size["height"] > 50, (p.get_attribute("data-plot"), p.size)
        dots = driver.find_elements(By.CSS_SELECTOR, 'svg.plot[data-plot="metric:val_loss"] circle.pt')
        assert len(dots) == len(want) and all(d.size["width"] > 0 for d in dots)
        bars = driver.find_elements(By.CSS_SELECTOR, 'svg.plot[data-plot="size"] rect.bar')
        assert bars and all(b.size["height"] > 0 for b in bars)
        rows = driver.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")
        assert [r.get_attribute("data-name") for r in rows] == sorted(want, key=lambda n: int(n.split("=")[1]))
        assert ODD in driver.find_element(By.CSS_SELECTOR, "#checkpoints thead").text
        assert driver.execute_script("return document.scripts.length") == 0
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


def test_odd_values_and_an_empty_folder(tmp_path):
    d = str(tmp_path / "odd")
    w = CheckpointWriter(d, async_save=False)
    hostile = {"<img src=x onerror=alert(1)>": 1.0, "nan_metric": float("nan"), "inf_metric": float("inf"),
               "huge": 1e308, "tiny": -1e308, "text": "</td><script>alert(2)</script>", "nested": {"a": [1, 2]}}
    for s in (1, 2, 3):
        w.save({"state_dict": {"w": torch.zeros(2)}, "global_step": s}, step=s, epoch=0, tags=["best", "<b>tag</b>"],
               metrics=dict(hostile, loss=1.0 / s))
    w.close()
    with open(os.path.join(d, "metrics.jsonl"), "a") as f:  # a history by hand: a pruned one, and junk
        f.write(json.dumps({"step": 0, "name": "step=000000", "tags": ["<i>x</i>"], "time": 1.0,
                            "metrics": {"loss": "nan", "<svg onload=alert(3)>": 2}}) + "\n")
        f.write(json.dumps({"step": 5, "name": "step=000005", "tags": [], "time": 1e400, "metrics": {"loss": 10**400}})
                + "\n")  # an integer beyond the float range, an infinite time
        f.write("not json\n" + json.dumps({"step": "x", "name": 3}) + "\n" + "[1, 2]\n")
        f.write(json.dumps({"step": 10**30, "name": "big", "metrics": {}}) + "\n")
    out = write_report(d, monitor="loss", mode="min")
    page = parse(out)
    assert page.rows == {"step=000000": {"pruned"}, "step=000001": {"kept", "best"}, "step=000002": {"kept", "best"},
                         "step=000003": {"kept", "best", "star"}, "step=000005": {"pruned"}}
    assert {"script", "img"}.isdisjoint(page.tags) and "<svg onload" not in open(out).read()
    assert not [k for k, _ in page.attrs if k.startswith("on") or k in ("src", "href")]
    assert "4 malformed line(s)" in open(out).read()
    assert sum(n for k, n in page.plots["metric:nan_metric"].items() if k.endswith(".nonfinite")) == 3
    assert sum(n for k, n in page.plots["metric:loss"].items() if k.endswith(".nonfinite")) == 2  # "nan", 10**400
    # every coordinate is a finite number whatever the values (1e308, -1e308, NaN, inf)
    assert not any(not math.isfinite(float(v)) for k, v in page.attrs if k in ("x", "y", "cx", "cy", "width", "height"))

    empty = tmp_path / "empty"
    empty.mkdir()
    page = parse(write_report(str(empty)))
    assert page.rows == {} and set(page.plots) == {"stall", "size"}
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(empty), "-o", str(tmp_path / "x" / "out.html")]) == 0
    assert os.path.isfile(tmp_path / "x" / "out.html")


def test_report_of_an_s3_folder(run_dir, s3, tmp_path, monkeypatch):
    from lightning_ckpt.folder.transfer import push_checkpoint

    monkeypatch.setenv("LIGHTNING_CKPT_CACHE", str(tmp_path / "cache"))
    for c in list_checkpoints(run_dir):  # into this module's bucket on the session's S3 server (the s3 fixture)
        push_checkpoint(c.path, f"s3://{BUCKET}/run")
    monkeypatch.chdir(tmp_path)
    assert main(["report", f"s3://{BUCKET}/run"]) == 0
    page = parse(str(tmp_path / "run-report.html"))
    want, _ = expected_statuses(run_dir)
    assert page.rows == {n: s for n, s in want.items() if "kept" in s}  # no history on S3: nothing known as pruned
    assert "metric:val_loss" in page.plots
