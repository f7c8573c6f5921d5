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




def _fresh(s3, prefix: str) -> tuple[list[str], list[str]]:
    """The location as a fresh reader sees it, straight from the server: the names of the readable checkpoints in
    listing order (step, commit time, name) and the names whose manifest cannot be read."""
    from lightning_ckpt.errors import CheckpointError
    from lightning_ckpt.format.manifest import parse_manifest

    c = s3.client()
    keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
            for o in page.get("Contents", []) if o["Key"].endswith("/manifest.json")]
    good, bad = [], []
    for key in keys:
        name = key[len(prefix) + 1:-len("/manifest.json")]
        try:
            m = parse_manifest(c.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key)
        except CheckpointError:
            bad.append(name)
            continue
        good.append(((int(m["step"]), m.get("created_unix") or 0.0, name), name))
    return [n for _, n in sorted(good)], sorted(bad)


@pytest.mark.s3
def test_a_held_location_scanned_after_each_change_matches_a_fresh_listing_without_a_pass_over_it(tmp_path, s3):
    """Held, a scan moves the records of the names changed since the last scan only (``KEPT.passes`` stays), keeps
    the same objects for the others, and gives what a fresh reader of the location sees: across commits, a name
    committed again with another manifest, deletions (of a readable and of an unreadable checkpoint) and several
    changes between two scans. A new listing (``invalidate``) takes one whole pass, and the scans after it move
    again."""
    import random

    from lightning_ckpt.read import scan_checkpoints

    prefix = "moves"
    uri = s3.uri(prefix)
    template = _template(tmp_path)
    _fill(s3, prefix, template, 12)
    s3.client().put_object(Bucket=BUCKET, Key=f"{prefix}/torn/manifest.json", Body=b"{not json")
    store = S3Store(uri)
    rng = random.Random(22)
    KEPT.hold(store)
    try:
        def check() -> list:
            infos, bad = scan_checkpoints(uri)
            want_good, want_bad = _fresh(s3, prefix)
            assert [c.name for c in infos] == want_good
            assert sorted(p.rsplit("/", 1)[-1] for p, _ in bad) == want_bad
            return infos

        last = check()
        passes = KEPT.passes
        names = [c.name for c in last]
        for round_ in range(14):
            changed = set()
            for _ in range(rng.randint(1, 3)):
                op = rng.choice(["commit", "again", "delete"])
                if op == "commit" or not names:
                    name = f"new-{round_}-{len(changed)}"
                    # a step inside the range already there: sorted among the others, not appended
                    store.begin(name).commit(manifest_for(template, rng.randint(1_000_000, 1_000_200),
                                                          created=rng.random()))
                    names.append(name)
                elif op == "again":
                    name = rng.choice(names)
                    store.begin(name).commit(manifest_for(template, rng.randint(0, 2_000_000)), if_exists="replace")
                else:
                    name = names.pop(rng.randrange(len(names)))
                    store.delete(name)  # (only a manifest there: it reports nothing left to delete)
                changed.add(name)
            now = check()
            assert KEPT.passes == passes  # moved, not a pass over every entry
            before = {c.name: c for c in last}
            for c in now:  # the same objects for the names not changed (folder/index.py diffs by identity)
                if c.name not in changed:
                    assert c is before[c.name]
            last = now
        store.delete("torn")  # the unreadable one leaves the errors
        assert check() and KEPT.passes == passes
        KEPT.invalidate(store)
        check()
        assert KEPT.passes == passes + 1
        store.begin("after").commit(manifest_for(template, 5))
        assert check()[0].name == "after" and KEPT.passes == passes + 1
    finally:
        KEPT.release(store)


@pytest.mark.s3
def test_the_manifest_cache_stays_within_its_budget_and_forgets_what_this_process_uncommits(tmp_path, s3):
    """Every manifest this process pushes is cached parsed by ETag (no GET of what it just wrote): over a long run
    that must not pile up. The cache keeps the most recently used within its byte budget and drops a name's
    manifests when this process uncommits it; what it dropped is read again from the server, correct."""
    from lightning_ckpt.read import scan_checkpoints
    from lightning_ckpt.store.s3listing import MANIFESTS

    uri = s3.uri("budget")
    template = _template(tmp_path)
    store = S3Store(uri)
    raw = [manifest_for(template, 100 + i, created=1.0 + i) for i in range(10)]
    budget = 3 * max(len(r) for r in raw) * s3listing.PARSED_PER_BYTE
    MANIFESTS.clear()
    MANIFESTS.budget = budget
    KEPT.hold(store)  # as an uploader does (it lists the location first): its commits are cached
    store.names()
    try:
        for i, r in enumerate(raw):
            store.begin(f"step={100 + i}").commit(r)
            assert MANIFESTS.nbytes <= budget
        KEPT.release(store)
        assert 1 <= len(MANIFESTS) <= 3
        newest = (BUCKET, store.key("step=109", "manifest.json"), f'"{hashlib.md5(raw[-1]).hexdigest()}"')
        assert newest in MANIFESTS  # the most recent stays
        infos, bad = scan_checkpoints(uri)  # the others are read again: the same checkpoints
        assert [c.step for c in infos] == list(range(100, 110)) and not bad
        assert MANIFESTS.nbytes <= budget
        store.delete("step=109")
        assert newest not in MANIFESTS
        assert [c.step for c in scan_checkpoints(uri)[0]] == list(range(100, 109))
    finally:
        if KEPT.held(store):
            KEPT.release(store)
        MANIFESTS.budget = None
        MANIFESTS.clear()


@pytest.mark.s3
def test_scans_beside_a_thread_that_commits_and_deletes_end_as_a_fresh_listing(tmp_path, s3):
    """The uploader's thread commits and deletes while another thread (a callback listing an ``s3://`` dirpath) scans:
    every scan is a sorted listing of readable checkpoints, and once the changes stop the next scan is exactly what
    a fresh reader sees, without a pass over the location."""
    import random
    import threading

    from lightning_ckpt.read import scan_checkpoints

    prefix = "threads"
    uri = s3.uri(prefix)
    template = _template(tmp_path)
    _fill(s3, prefix, template, 8)
    store = S3Store(uri)
    KEPT.hold(store)
    stop = threading.Event()
    seen: list = []
    errors: list = []

    def reader() -> None:
        try:
            while not stop.is_set():
                infos, _ = scan_checkpoints(uri)
                keys = [(c.step, c.created_unix or 0.0, c.name) for c in infos]
                assert keys == sorted(keys) and len({c.name for c in infos}) == len(infos)
                seen.append(len(infos))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    try:
        scan_checkpoints(uri)
        passes = KEPT.passes
        t = threading.Thread(target=reader)
        t.start()
        rng = random.Random(7)
        names = [f"step={1_000_000 + 10 * i:07d}" for i in range(8)]
        try:
            for i in range(30):
                if names and rng.random() < 0.4:
                    store.delete(names.pop(rng.randrange(len(names))))
                else:
                    name = f"mine-{i}"
                    store.begin(name).commit(manifest_for(template, rng.randint(1_000_000, 1_000_100),
                                                          created=rng.random()))
                    names.append(name)
        finally:
            stop.set()
            t.join(30)
        assert not errors, errors
        assert seen  # the reader ran beside the changes
        infos, bad = scan_checkpoints(uri)
        assert [c.name for c in infos] == _fresh(s3, prefix)[0] and not bad
        assert KEPT.passes == passes
    finally:
        KEPT.release(store)
