"""One store contract, both backends: the same assertions against a ``LocalStore`` and an ``S3Store`` (the session's
SeaweedFS server): the transaction's operations, commit with each ``if_exists``, abort, the cleanup policy (a dead
writer's partial entry vs a live one's), delete with the collection of the packs it orphaned, the lock capability,
and the kept listing behind ``read.scan_checkpoints``. The tests ask the store's capabilities, never its type."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from lightning_ckpt.errors import CheckpointCorruptError
from lightning_ckpt import CheckpointWriter, list_checkpoints, load_checkpoint, verify_checkpoint
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.format.codec import encode
from lightning_ckpt.read import scan_checkpoints
from lightning_ckpt.store import open_store
from lightning_ckpt.store.base import NoLock, Store, Transaction, owner_token
from lightning_ckpt.store.lock import FolderBusyError

BUCKET = "contract"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "folder"))
    request.getfixturevalue("s3")
    return open_store(f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}")


def _manifest(files: dict, step: int, name: str, state: str) -> bytes:
    m = {"format": mf.FORMAT_NAME, "format_version": mf.PLAIN_VERSION, "kind": "full", "name": name, "step": step,
         "epoch": None, "tags": [], "created_unix": time.time(), "files": files, "tensors": {},
         "state_files": {"0": state}, "metrics": {}, "hparams": {}}
    raw = mf.dumps(m)
    mf.parse_manifest(raw, "the test manifest")
    return raw


def _write(store: Store, name: str, step: int, *, how: str = "bytes") -> Transaction:
    """A transaction of entry ``name`` with one state file written through ``how`` (each operation of the contract)."""
    tx = store.begin(name).open()
    doc, _ = encode({"step": step})
    data = json.dumps(doc).encode()
    state = mf.state_file_name(0)
    if how == "bytes":
        rec = tx.write_bytes(state, data)
    else:  # the same bytes through put_file (copy a local file in) and through a file written into tx.path
        from lightning_ckpt.format.tensorfile import encode_bytes

        enc = encode_bytes(state, data)
        rec = enc.record()
        src = tx.file(state) if how == "path" else tempfile.mkstemp()[1]
        with open(src, "wb") as f:
            for piece in enc.pieces:
                f.write(piece)
        if how == "put":
            tx.put_file(state, src)
            os.unlink(src)
    tx.sync()
    tx.manifest = _manifest({state: {"size": rec.size, "header_end": rec.header_end,
                                     "header_crc32c": rec.header_crc32c}}, step, name, state)
    return tx


def _step(store: Store, name: str) -> int:
    return store.read_manifest(name)[0]["step"]


@pytest.mark.parametrize("how", ["bytes", "put", "path"])
def test_every_write_operation_gives_a_checkpoint_that_verifies(store, how):
    tx = _write(store, "a", 1, how=how)
    assert tx.commit(tx.manifest) == "a" and tx.committed == "a"
    assert store.names() == ["a"]
    verify_checkpoint(store.path("a"))
    assert [c.step for c in list_checkpoints(store.uri)] == [1]


def test_commit_with_each_if_exists(store):
    first = _write(store, "a", 1)
    assert first.commit(first.manifest, if_exists="version") == "a"
    second = _write(store, "a", 2)  # the name is taken: the next free version
    assert second.commit(second.manifest, if_exists="version") == "a-v2"
    third = _write(store, "a", 3)  # taken: this entry is dropped, the committed one stays as it was
    assert third.commit(third.manifest, if_exists="discard") is None
    fourth = _write(store, "b", 4)
    assert fourth.commit(fourth.manifest, if_exists="discard") == "b"
    fifth = _write(store, "a", 5)  # swapped for the committed one
    assert fifth.commit(fifth.manifest, if_exists="replace") == "a"
    assert sorted(store.names()) == ["a", "a-v2", "b"]
    assert [_step(store, n) for n in ("a", "a-v2", "b")] == [5, 2, 4]
    for n in ("a", "a-v2", "b"):
        verify_checkpoint(store.path(n))  # no object of another entry mixed in
    assert store.debris(older_than_s=0) == []  # nothing staged or partial is left behind
    with pytest.raises(ValueError):
        _write(store, "c", 6).commit(b"{}", if_exists="sideways")


def test_abort_leaves_nothing(store):
    tx = _write(store, "a", 1)
    tx.abort()
    assert store.names() == [] and store.debris(older_than_s=0) == []
    with pytest.raises(Exception):
        store.read_manifest("a")


def _dead_owner() -> str:
    """The owner token of a process of this machine that has exited."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{owner_token().partition('.')[0]}.{int(p.stdout)}"


def test_cleanup_removes_a_dead_writers_partial_entry_not_a_live_ones(store):
    dead = store.begin("a", owner=_dead_owner()).open()
    live = store.begin("b", owner=f"{owner_token().partition('.')[0]}.1").open()  # pid 1: alive, not this process
    for tx in (dead, live):
        tx.write_bytes("x.bin", b"0123")
        tx.sync()
    if store.owners_recorded:  # each partial carries its writer: the dead one's is debris at once, whatever its age
        assert [os.path.basename(p).split("~")[0] for p in store.debris()] == [".partial-a"]
        store.cleanup()
        assert store.debris(everyone=True) != []  # the live writer's partial is still there (only the lock holder's)
        assert store.live_writer()
    else:  # objects under an entry's name carry no owner: they are debris once nothing touched them for older_than_s
        assert store.debris(older_than_s=3600) == []
        assert sorted(store.cleanup(older_than_s=0)) == ["a", "b"]
        assert not store.live_writer()
    assert store.names() == []


def test_cleanup_of_writes_onto_a_committed_name_goes_by_owner_on_both(store):
    """A write onto a name already committed is staged under ``.partial-<name>~<owner>~<id>`` on both backends, and
    the owner decides: a dead writer's is debris at once, a live one's is left alone, the committed entry stays."""
    tx = _write(store, "a", 1)
    tx.commit(tx.manifest)
    host = owner_token().partition(".")[0]
    for owner in (_dead_owner(), f"{host}.1"):
        w = store.begin("a", owner=owner).open()
        w.write_bytes("x.bin", b"0123")
        w.sync()
    staged = sorted(os.path.basename(p) for p in store.debris(everyone=False, older_than_s=3600))
    assert len(staged) == 1 and staged[0].startswith(".partial-a~") and staged[0].split("~")[1] != f"{host}.1"
    store.cleanup(older_than_s=3600)
    assert store.debris(older_than_s=3600) == [] and store.names() == ["a"]
    verify_checkpoint(store.path("a"))


def _dedup_saves(folder: str, n: int) -> None:
    """``n`` checkpoints whose frozen tensor lives in a pack of the content store, and whose trained one changes, so
    that deleting all but the last orphans no pack and deleting the last does."""
    frozen = torch.arange(4096, dtype=torch.float32)
    w = CheckpointWriter(folder, async_save=False)
    for step in range(n):
        w.save({"state_dict": {"frozen": frozen, "trained": torch.full((8,), float(step))}}, step=step,
               stable=["state_dict/frozen"])
    w.close()


def test_delete_collects_what_it_orphans(store, tmp_path):
    src = str(tmp_path / "src")
    _dedup_saves(src, 2)
    if store.read_cache:  # the checkpoints are pushed there (the contract's readers then read them the same way)
        from lightning_ckpt.folder.transfer import push_checkpoint

        for c in list_checkpoints(src):
            push_checkpoint(c.path, store.uri)
    else:
        store = open_store(src)
    names = [c.name for c in list_checkpoints(store.uri)]
    packs = store.pack_names()
    assert len(names) == 2 and packs
    sizes = store.pack_sizes()
    assert sorted(sizes) == packs and all(n > 0 for n in sizes.values())
    assert store.may_collect()  # nobody writes the folder
    assert store.delete(names[0], collect=True)
    assert store.pack_names() == packs  # the remaining checkpoint still references them
    verify_checkpoint(store.path(names[1]))
    assert load_checkpoint(store.path(names[1]))["state_dict"]["trained"][0] == 1.0
    got = store.remove([names[1], "never-there"], collect=True, mine=set(packs))
    assert got.deleted == [names[1]] and sorted(got.packs) == sorted(packs) and got.freed == sum(sizes.values())
    assert store.pack_names() == [] and store.names() == []


def test_no_collection_beside_a_live_writer_where_packs_are_written_before_their_manifest(store, tmp_path,
                                                                                         monkeypatch):
    """``may_collect``: locally a save in progress writes packs before the manifest that references them, so nobody
    collects beside a live writer unless it holds the folder's lock (here locks are off: nobody holds it); on S3
    the grace period protects uploads in progress, so a collection may always run."""
    src = str(tmp_path / "src")
    _dedup_saves(src, 1)
    if store.locking:
        monkeypatch.setenv("LIGHTNING_CKPT_LOCK", "0")
        store = open_store(src)
        live = store.begin("next", owner=f"{owner_token().partition('.')[0]}.1").open()  # pid 1: alive
        live.write_bytes("x.bin", b"0")
        assert store.live_writer() and not store.may_collect()
        packs = store.pack_names()
        assert store.remove([c.name for c in list_checkpoints(src)], collect=True).packs == []
        assert store.pack_names() == packs  # left for a collection once the writer is done
        live.abort()
        assert store.may_collect() and store.collect_orphans()[0] == packs
    else:
        assert store.may_collect() and not store.live_writer()


def test_the_lock_capability(store):
    lk = store.lock({"run_id": "contract"})
    try:
        if store.locking:
            assert lk.held and store.lock_holder() is not None
            assert store.lock_unless_mine() is None  # this process holds it already
            assert store.owns(lk)
            with pytest.raises(FolderBusyError):  # taken: nobody else takes it (this process included)
                store.lock({"run_id": "another"})
        else:  # no lock on this backend: holding it excludes nobody, and its holder owns no other writer's partials
            assert isinstance(lk, NoLock) and not lk.held
            assert store.lock_holder() is None and store.lock_unless_mine() is None
            assert not store.owns(lk)
            store.lock({"run_id": "another"}).release()  # never busy
    finally:
        lk.release()
    assert store.lock_holder() is None


def test_the_kept_listing_answers_through_the_store(store, tmp_path):
    """``read.scan_checkpoints`` asks the store for its kept listing (``Store.kept``); held or not, the answer is the
    folder's checkpoints."""
    for i, n in enumerate(["a", "b"]):
        tx = _write(store, n, i)
        tx.commit(tx.manifest)
    lk = store.lock()
    store.hold_listing()
    try:
        first = [c.name for c in scan_checkpoints(store.uri)[0]]
        tx = _write(store, "c", 2)
        tx.commit(tx.manifest)
        assert store.delete("a")
        assert [c.name for c in scan_checkpoints(store.uri)[0]] == ["b", "c"]
        assert store.kept(lambda n, m: n, str) is not None  # a listing is kept while the lock or an uploader holds it
    finally:
        store.release_listing()
        lk.release()
    assert first == ["a", "b"]
    assert store.kept(lambda n, m: n, str) is None and not store.listing_kept()


def test_the_folders_own_files(store):
    """A file beside the entries (``metrics.jsonl``, a note): replaced atomically, read with a bound, never listed."""
    assert store.read_file("notes.jsonl", 1 << 10) is None
    store.write_atomic("notes.jsonl", b'{"a": 1}\n')
    store.write_atomic("notes.jsonl", b'{"a": 2}\n')
    assert store.read_file("notes.jsonl", 1 << 10) == b'{"a": 2}\n'
    with pytest.raises(CheckpointCorruptError):
        store.read_file("notes.jsonl", 4)
    with pytest.raises(ValueError):
        store.write_atomic("../escape", b"")
    assert store.names() == []
