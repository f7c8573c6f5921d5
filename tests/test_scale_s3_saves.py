"""Saves into an S3 location of many checkpoints (issue 22): while a run uploads there, the location's listing is kept
in memory (``store/s3listing.py``), so retention, the callbacks and the pack collection make no LIST request of the
whole location per save; a checkpoint another process adds is seen at the next listing. The tests count requests."""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json

import pytest
import torch

from lightning_ckpt import CheckpointWriter, list_checkpoints
from lightning_ckpt.callbacks import BestMetricCheckpoint, EarlyStopAndSave, PeriodicCheckpoint, RetentionPolicy
from lightning_ckpt.demo import DemoModel
from lightning_ckpt.store import hint
from lightning_ckpt.store.s3 import S3Store, client
from lightning_ckpt.store import s3listing
from lightning_ckpt.store.s3listing import KEPT

from support import data, trainer
from support.clones import manifest_for

BUCKET = "scale-saves"
MANY = 300  # checkpoints at the location before the fit


def _template(tmp_path) -> dict:
    w = CheckpointWriter(str(tmp_path / "seed"), async_save=False)
    try:
        path = w.save({"state_dict": {"w": torch.randn(4, 4)}, "global_step": 1}, step=1).result().path
    finally:
        w.close()
    with open(f"{path}/manifest.json", "rb") as f:
        return json.loads(f.read())


def _fill(s3, prefix: str, template: dict, n: int) -> None:
    """``n`` committed checkpoints at ``prefix`` (manifests put directly: milestones of an older part of the run) and
    a ``latest.json`` whose index accounts for them."""
    idx = hint.Index()
    items = []
    for i in range(n):
        step = 1_000_000 + 10 * i
        raw = manifest_for(template, step, created=1.0 + i)
        items.append((f"step={step:07d}", raw))
        idx.add(items[-1][0], hashlib.md5(raw).hexdigest(), json.loads(raw), raw)
    c = s3.client()
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda it: c.put_object(Bucket=BUCKET, Key=f"{prefix}/{it[0]}/manifest.json", Body=it[1]), items))
    c.put_object(Bucket=BUCKET, Key=f"{prefix}/latest.json", Body=json.dumps(
        {"name": items[-1][0], "step": 0, "epoch": 0, "index": {**idx.to_doc(), "listed": n}}).encode())


def _lists(prefix: str):
    """The LIST requests made while it runs: (Prefix, ContinuationToken or None) each."""
    calls: list[tuple[str, str | None]] = []

    def before(params=None, **kwargs):
        calls.append((str((params or {}).get("Prefix", "")), (params or {}).get("ContinuationToken")))

    event = "before-parameter-build.s3.ListObjectsV2"
    client().meta.events.register(event, before)
    return calls, lambda: client().meta.events.unregister(event, before)


@pytest.mark.s3
def test_saves_into_an_s3_location_of_many_checkpoints_make_no_list_of_it_per_save(tmp_path, s3):
    """A fit with periodic saves, best-k, early stopping and retention into an ``s3://`` location of 300 checkpoints: the whole
    location is listed a fixed number of times (at the start), not after every upload for retention and again for
    the pack collection (before: 8 listings in 5 saves, each with pages that grow with the location); the other
    LISTs (the one checkpoint deleted, the packs if any) are a constant per save. Retention still keeps the
    milestones and deletes the rest."""
    uri = s3.uri("many")
    _fill(s3, "many", _template(tmp_path), MANY)
    saves = 5
    cbs = [PeriodicCheckpoint(uri, every_n_train_steps=1, allow_existing=True, async_save=False),
           BestMetricCheckpoint(uri, monitor="train_loss", every_n_train_steps=1, top_k=2, async_save=False),
           RetentionPolicy(uri, keep_last=2, keep_every_n_steps=10),
           EarlyStopAndSave(uri, monitor="train_loss", check_on_train_epoch_end=True, patience=100, async_save=False)]
    calls, stop = _lists("many")
    listings = KEPT.listings
    try:
        trainer(cbs, max_steps=saves, log_every_n_steps=1).fit(DemoModel(), data())
    finally:
        stop()
    whole = [c for c in calls if c[0] == "many/"]
    assert 1 <= len(whole) <= 2, whole  # one page each: the kept listing and latest.json's; 8 before (per save)
    assert KEPT.listings - listings <= 1  # retention, best-k, the collection: from the kept listing
    other = [c for c in calls if c[0] != "many/"]
    assert len(other) <= 3 * saves, other  # per save: the deleted checkpoint's objects (and the packs, if any)
    assert not KEPT.held(S3Store(uri))  # released at the end of fit
    steps = [c.step for c in list_checkpoints(uri)]  # a full listing: what is really there
    assert len([s for s in steps if s >= 1_000_000]) == MANY  # every milestone stays
    kept = [s for s in steps if s < 1_000_000]
    assert saves in kept and 1 <= len(kept) <= 4, kept  # the newest (the milestones are newer) and the best two


@pytest.mark.s3
def test_a_kept_listing_follows_this_process_and_sees_others_at_the_next_listing(tmp_path, s3):
    """Held: commits and deletions of this process are in the listing without a LIST; a checkpoint put by another
    process (here: directly) appears at the next listing (after ``RELIST_EVERY`` changes, or when invalidated), and
    one another process removed disappears then."""
    uri = s3.uri("kept")
    template = _template(tmp_path)
    _fill(s3, "kept", template, 5)
    store = S3Store(uri)
    KEPT.hold(store)
    try:
        assert len(store.manifests()) == 5
        calls, stop = _lists("kept")
        try:
            tx = store.begin("mine")
            tx.commit(manifest_for(template, 7))
            store.delete("step=1000000")
            got = dict(store.manifests())
        finally:
            stop()
        assert "mine" in got and "step=1000000" not in got and got["mine"]["step"] == 7
        assert [c for c in calls if c[0] == "kept/"] == []  # the delete lists only its own checkpoint's objects
        s3.client().put_object(Bucket=BUCKET, Key="kept/theirs/manifest.json", Body=manifest_for(template, 9))
        s3.client().delete_object(Bucket=BUCKET, Key="kept/step=1000010/manifest.json")
        assert "theirs" not in dict(store.manifests())  # not listed again yet
        KEPT.invalidate(store)
        got = dict(store.manifests())
        assert "theirs" in got and "step=1000010" not in got
        # after RELIST_EVERY changes the next call lists again by itself
        s3.client().put_object(Bucket=BUCKET, Key="kept/later/manifest.json", Body=manifest_for(template, 11))
        for i in range(s3listing.RELIST_EVERY):
            KEPT.deleted(store, f"gone-{i}")
        assert "later" in dict(store.manifests())
    finally:
        KEPT.release(store)
    assert not KEPT.held(store)


