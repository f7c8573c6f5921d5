"""Deduplicated checkpoints: frozen and unchanged tensors are written once into the folder's content store
(``.blobs/``) and referenced afterwards; every reader works on them; garbage collection removes only what no
committed checkpoint references; ``dedup=False`` keeps folders self-contained."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from lightning_ckpt import (
    CheckpointWriter,
    PeriodicCheckpoint,
    RetentionPolicy,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from lightning_ckpt.errors import CheckpointCorruptError
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.store import LocalStore
from lightning_ckpt.store.blobs import BlobStore
from lightning_ckpt.tools.diff import diff_checkpoints
from lightning_ckpt.folder.lineage import lineage
from lightning_ckpt.tools.prune import prune, remove_checkpoint
from lightning_ckpt.tools.standalone import export_standalone

STABLE = ["state_dict/frozen.weight", "state_dict/frozen.bias", "state_dict/stats"]


class FineTune(torch.nn.Module):
    """A frozen 'backbone', a buffer and a trainable head."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(width, 2)
        self.register_buffer("stats", torch.arange(width, dtype=torch.float32))

    def forward(self, x):
        return self.head(torch.relu(self.frozen(x)))


def train_step(model, opt) -> None:
    model(torch.randn(4, model.frozen.in_features)).sum().backward()
    opt.step()
    opt.zero_grad()


def state(model, opt) -> dict:
    return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "global_step": 0}


def packs_in(d) -> list[str]:
    return BlobStore(str(d)).names()


def frozen_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (model.frozen.weight, model.frozen.bias, model.stats))


def test_frozen_tensors_are_written_once_and_every_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    model = FineTune(128)
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=True)
    sizes, expected = [], []
    for step in range(4):
        train_step(model, opt)
        sizes.append(w.save(state(model, opt), step=step, stable=STABLE).result().bytes)
        expected.append({k: v.clone() for k, v in model.state_dict().items()})
    w.close()
    ckpts = list_checkpoints(tmp_path)
    assert len(packs_in(tmp_path)) == 1
    # the first save wrote the frozen part; the later ones only what changed (the head and Adam's state)
    assert sizes[0] > frozen_bytes(model)
    assert all(s < sizes[0] - frozen_bytes(model) * 0.9 for s in sizes[1:]), sizes
    for c, exp in zip(ckpts, expected):
        assert c.manifest["format_version"] == 2
        assert set(c.manifest["packs"]) == set(packs_in(tmp_path))
        verify_checkpoint(c.path)
        got = load_checkpoint(c.path)["state_dict"]
        assert set(got) == set(exp)
        for k in exp:
            assert torch.equal(got[k], exp[k]), (c.name, k)


def test_dedup_false_keeps_every_folder_self_contained(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=False, dedup=False)
    for step in range(2):
        train_step(model, opt)
        w.save(state(model, opt), step=step, stable=STABLE)
    w.close()
    assert not os.path.exists(tmp_path / mf.BLOBS)
    for c in list_checkpoints(tmp_path):
        assert c.manifest["format_version"] == mf.PLAIN_VERSION and "packs" not in c.manifest


def test_unchanged_trainable_tensors_move_into_the_store_on_their_second_save(tmp_path):
    """No hint needed: a tensor found unchanged since the previous save is packed, then referenced."""
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    train_step(model, opt)
    w = CheckpointWriter(tmp_path, async_save=False)
    for step in range(3):
        w.save(state(model, opt), step=step)  # no stable= and no training in between
    w.close()
    a, b, c = list_checkpoints(tmp_path)
    assert "packs" not in a.manifest
    assert b.manifest.get("packs") and c.manifest["packs"] == b.manifest["packs"]
    assert c.size_bytes < a.size_bytes / 4


def test_a_change_through_data_that_skips_the_version_counter_is_still_saved(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=True)
    w.save(state(model, opt), step=0, stable=STABLE).result()
    w.save(state(model, opt), step=1, stable=STABLE).result()
    v = model.frozen.weight._version
    model.frozen.weight.data.mul_(0.5).add_(1.0)  # .data: the parameter's version counter does not move
    assert model.frozen.weight._version == v
    w.save(state(model, opt), step=2, stable=STABLE).result()
    w.close()
    got = load_checkpoint(list_checkpoints(tmp_path)[-1].path)["state_dict"]
    assert torch.equal(got["frozen.weight"], model.frozen.weight)


def test_a_new_process_finds_the_stored_tensors_by_content_hash(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=False)
    w.save(state(model, opt), step=0, stable=STABLE)
    w.close()
    w2 = CheckpointWriter(tmp_path, async_save=False)  # a resumed or branched run: nothing in memory
    res = w2.save(state(model, opt), step=1, stable=STABLE).result()
    w2.close()
    assert len(packs_in(tmp_path)) == 1
    assert res.bytes < frozen_bytes(model)
    second = list_checkpoints(tmp_path)[-1]
    assert {c["pack"] for k in STABLE for c in second.manifest["tensors"][k]["chunks"]} == set(packs_in(tmp_path))


def test_retention_and_prune_remove_only_unreferenced_packs(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=False)
    w.save(state(model, opt), step=0, stable=STABLE)
    w.save(state(model, opt), step=1, stable=STABLE)
    with torch.no_grad():
        model.frozen.weight.add_(1.0)  # the "backbone" changes once (say, unfrozen for a while)
    w.save(state(model, opt), step=2, stable=STABLE)
    w.close()
    first_pack = set(list_checkpoints(tmp_path)[0].manifest["packs"])
    from lightning_ckpt.policy.retention import RetentionRules

    dry = prune(str(tmp_path), RetentionRules(keep_last=2), dry_run=True)
    assert [os.path.basename(d["path"]) for d in dry.deleted] == ["step=000000"]
    assert dry.packs == []  # step 1 still references the first pack
    prune(str(tmp_path), RetentionRules(keep_last=2))
    assert first_pack <= set(packs_in(tmp_path))
    report = prune(str(tmp_path), RetentionRules(keep_last=1))
    assert {os.path.basename(p["path"]) for p in report.packs} == {
        p for p in first_pack if p not in (list_checkpoints(tmp_path)[-1].manifest.get("packs") or {})}
    survivors = list_checkpoints(tmp_path)
    assert [c.name for c in survivors] == ["step=000002"]
    verify_checkpoint(survivors[0].path)
    assert set(packs_in(tmp_path)) == set(survivors[0].manifest.get("packs") or {})


def test_collection_stops_when_a_manifest_cannot_be_read(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=False)
    w.save(state(model, opt), step=0, stable=STABLE)
    w.save(state(model, opt), step=1, stable=STABLE)
    w.close()
    a, b = list_checkpoints(tmp_path)
    with open(os.path.join(b.path, mf.MANIFEST), "r+b") as f:  # b references the pack; a is removed
        f.seek(10)
        f.write(b"#")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        remove_checkpoint(a.path, force=True)  # with b unreadable, a is the newest a resume can use: forced
    assert packs_in(tmp_path), "a pack was removed although an unreadable manifest may reference it"


def test_a_missing_pack_is_written_again_or_fails_the_save_cleanly(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=True, auto_seal=False)

    def save(step, **kw):
        p = w.save(state(model, opt), step=step, stable=STABLE, **kw)
        return p

    def remove_packs():  # deleted by hand behind the writer's back
        for p in packs_in(tmp_path):
            os.unlink(os.path.join(tmp_path, mf.BLOBS, p))

    save(0)
    w.seal()
    w.wait()
    remove_packs()  # before the next save: it finds them gone and writes the tensors again
    save(1)
    w.seal()
    assert w.wait().bytes > frozen_bytes(model)
    verify_checkpoint(list_checkpoints(tmp_path)[-1].path)
    pending = save(2, sync=True)  # written, referencing the pack of step 1; not committed yet
    remove_packs()  # between the write and the commit: the commit refuses to reference it
    from lightning_ckpt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing"):
        w.seal()  # a sync save commits in the caller's thread, when sealed
    with pytest.raises(CheckpointError, match="missing"):
        pending.result()
    save(3)
    w.seal()
    res = w.wait()
    w.close()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step=000000", "step=000001", "step=000003"]
    verify_checkpoint(res.path)
    for c in list_checkpoints(tmp_path)[:2]:
        with pytest.raises(CheckpointCorruptError):
            verify_checkpoint(c.path)


def test_standalone_export_needs_nothing_else(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path / "run", async_save=False)
    w.save(state(model, opt), step=0, stable=STABLE)
    res = w.save(state(model, opt), step=1, stable=STABLE).result()
    w.close()
    out = export_standalone(res.path, tmp_path / "out")
    import shutil

    shutil.rmtree(tmp_path / "run")  # the source folder and its content store are gone
    m = json.loads(open(os.path.join(out, mf.MANIFEST)).read())
    assert m["format_version"] == mf.PLAIN_VERSION and "packs" not in m
    verify_checkpoint(out)
    got = load_checkpoint(out)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v)
    with pytest.raises(FileExistsError):
        export_standalone(out, tmp_path / "out")


def test_diff_says_what_changed_from_the_manifests(tmp_path):
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=False)
    w.save(state(model, opt), step=0, stable=STABLE)
    train_step(model, opt)
    w.save(state(model, opt), step=1, stable=STABLE)
    w.close()
    a, b = list_checkpoints(tmp_path)
    d = diff_checkpoints(a.path, b.path, prefix="state_dict/", values=False)
    assert {t.key for t in d.changed} == {"state_dict/head.weight", "state_dict/head.bias"}
    assert all(t.max_abs_diff is None for t in d.changed)


# ------------------------------------------------------------------ Lightning
def _fit(dirpath, max_steps, ckpt_path=None, keep_last=2, lr=1e-2, **kw):
    import lightning.pytorch as pl

    from lightning_ckpt.demo import DemoDataModule, DemoModel

    torch.manual_seed(0)
    model = DemoModel(hidden=96, layers=3, frozen_layers=2, lr=lr)
    cbs = [PeriodicCheckpoint(dirpath, every_n_train_steps=2, **kw), RetentionPolicy(dirpath, keep_last=keep_last)]
    t = pl.Trainer(max_steps=max_steps, callbacks=cbs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
                   devices=1, default_root_dir=str(dirpath) + "-root")
    t.fit(model, DemoDataModule(n_train=64, n_val=16, batch_size=16), ckpt_path=ckpt_path)
    return model, cbs[0]


def test_lightning_fine_tune_writes_the_frozen_layers_once_and_resumes(tmp_path):
    d = tmp_path / "ckpts"
    model, cb = _fit(d, 8)
    ckpts = list_checkpoints(d)
    assert [c.name for c in ckpts] == ["step=000006", "step=000008"]
    pack_names = set(packs_in(d))
    assert len(pack_names) == 1 and all(set(c.manifest["packs"]) == pack_names for c in ckpts)
    frozen = {k for k, v in ckpts[-1].manifest["tensors"].items() if "pack" in v["chunks"][0]}
    assert {"state_dict/net.0.weight", "state_dict/net.3.weight"} <= frozen
    assert not any(k.startswith("optimizer_states") for k in frozen)
    # fit(ckpt_path=...) on a deduplicated checkpoint, and the run goes on sharing the same pack
    model2, _ = _fit(d, 12, ckpt_path=latest_checkpoint(d), allow_existing=True)
    got = load_checkpoint(latest_checkpoint(d))["state_dict"]
    for k, v in model2.state_dict().items():
        assert torch.equal(got[k], v), k
    assert set(packs_in(d)) == pack_names


def test_lineage_counts_shared_bytes_once(tmp_path):
    d = tmp_path / "ckpts"
    _fit(d, 6)
    roots = lineage(str(d))
    assert len(roots) == 1
    nodes = roots[0].checkpoints
    assert nodes[0].own_bytes > nodes[1].own_bytes  # the first one brought the pack
    assert abs(nodes[1].total_bytes - nodes[0].total_bytes) < 0.01 * nodes[0].total_bytes  # the same content


def test_lineage_continues_a_run_on_resume_and_branches_from_an_older_checkpoint(tmp_path):
    d = tmp_path / "ckpts"
    _fit(d, 4, keep_last=10)
    first = list_checkpoints(d)
    _fit(d, 6, ckpt_path=first[-1].path, keep_last=10, allow_existing=True)  # from the newest: the same run
    _fit(d, 8, ckpt_path=first[0].path, keep_last=10, allow_existing=True)  # rewind to an older one: a new run
    roots = lineage(str(d))
    assert len(roots) == 1
    root = roots[0]
    assert root.parent is None
    assert [n.step for n in root.checkpoints] == sorted(n.step for n in root.checkpoints)
    assert len(root.children) == 1
    child = root.children[0]
    assert child.branch and child.parent == first[0].name
    runs = {c.manifest["lineage"]["run"] for c in list_checkpoints(d)}
    assert runs == {root.run, child.run}


def test_a_branch_into_the_same_folder_shares_bytes_keeps_its_own_retention_and_resumes_itself(tmp_path):
    d = tmp_path / "ckpts"
    _fit(d, 6)
    main_before = [c.name for c in list_checkpoints(d)]
    assert main_before == ["step=000004", "step=000006"]
    _fit(d, 10, resume_from="step=000004", run_name="lr2")  # a branch from an older checkpoint, with its own name
    names = [c.name for c in list_checkpoints(d)]
    assert names == ["step=000004", "step=000006", "lr2-step=000008", "lr2-step=000010"]  # step 6 of lr2 pruned
    assert len(packs_in(d)) == 1  # the frozen layers are shared with the main run
    branch = list_checkpoints(d)[-1].manifest["lineage"]
    assert branch["run_name"] == "lr2" and branch["branch"] and branch["parent"] == "step=000004"
    # relaunched with resume="auto", the branch continues itself (not the main run, not its branch point)
    _fit(d, 12, resume_from="step=000004", run_name="lr2", resume="auto")
    last = list_checkpoints(d)[-1]
    assert last.name == "lr2-step=000012" and last.manifest["lineage"]["run"] == branch["run"]
    # and the main run resumes its own newest checkpoint
    _fit(d, 8, resume="auto")
    assert latest_checkpoint(d, run_name=None).endswith("step=000008")
    roots = lineage(str(d))
    assert len(roots) == 1 and [r.run_name for r in roots[0].children] == ["lr2"]
    with pytest.raises(ValueError, match="run_name"):
        PeriodicCheckpoint(d, run_name="../escape")


def test_a_branch_trains_with_its_own_optimizer_settings(tmp_path):
    d = tmp_path / "ckpts"
    _fit(d, 6)
    _fit(d, 10, resume_from="step=000006", run_name="fast", lr=0.05)
    group = load_checkpoint(list_checkpoints(d)[-1].path)["optimizer_states"][0]["param_groups"][0]
    # the new base learning rate, with the parent's schedule position (StepLR: x0.9 every 5 steps, 2 steps done)
    assert group["initial_lr"] == 0.05 and abs(group["lr"] - 0.05 * 0.9 ** 2) < 1e-9
    parent = load_checkpoint(str(d / "step=000006"))["optimizer_states"][0]["param_groups"][0]
    assert parent["initial_lr"] == 0.01


# ------------------------------------------------------------------ content found by hash after a collection
def _flip_saves(w, f, t, steps):
    """Save ``{f, t}`` at each step, ``t`` trained every step; ``f`` (stable) changes sign before the saves in
    ``steps`` marked True. Returns the results."""
    out = []
    for step, flip in steps:
        t.add_(1.0)
        if flip:
            f.mul_(-1.0)
        out.append(w.save({"state_dict": {"f": f, "t": t}}, step=step, stable=["state_dict/f"]).result())
    return out


def test_content_of_a_collected_pack_is_written_again_not_referenced(tmp_path):
    """A stable tensor returns to the bytes of a pack that retention and collection removed since: the writer's
    content index still named that pack, and the save failed ("deleted by hand or by another process")."""
    f, t = torch.randn(256), torch.randn(8)
    w = CheckpointWriter(tmp_path, async_save=False)
    # 1: f packed (pack A); 2: f flipped, in the checkpoint's own files; 3: unchanged, packed (pack B); 4: flipped
    # back to A's bytes, own files
    _flip_saves(w, f, t, [(1, False), (2, True), (3, False), (4, True)])
    pack_a = set(list_checkpoints(tmp_path)[0].manifest["packs"])
    for c in list_checkpoints(tmp_path)[:-1]:
        remove_checkpoint(c.path)  # retention: A is referenced by nothing now, and collected
    assert not pack_a & set(packs_in(tmp_path))
    (res,) = _flip_saves(w, f, t, [(5, False)])  # unchanged since 4: its bytes are A's, which is gone
    w.close()
    verify_checkpoint(res.path)
    assert torch.equal(load_checkpoint(res.path)["state_dict"]["f"], f)
    assert set(list_checkpoints(tmp_path)[-1].manifest["packs"]) <= set(packs_in(tmp_path))


def test_a_pack_found_by_hash_survives_a_collection_before_the_commit(tmp_path):
    """The save decided to reference pack A (found by content hash), then retention removed the last checkpoint
    that referenced A and collected, all before the save's commit: A is held for the save, which commits."""
    f, t = torch.randn(256), torch.randn(8)
    w = CheckpointWriter(tmp_path, async_save=True, auto_seal=False)
    for step, flip in [(1, False), (2, True), (3, False), (4, True)]:
        t.add_(1.0)
        if flip:
            f.mul_(-1.0)
        w.save({"state_dict": {"f": f, "t": t}}, step=step, stable=["state_dict/f"])
        w.seal()
        w.wait()
    first = list_checkpoints(tmp_path)[0]
    pack_a = set(first.manifest["packs"])
    t.add_(1.0)
    # written now (sync=True), committed when sealed: its decision references A
    pending = w.save({"state_dict": {"f": f, "t": t}}, step=5, stable=["state_dict/f"], sync=True)
    for c in list_checkpoints(tmp_path)[:-1]:
        LocalStore(tmp_path).delete(c.name)
    LocalStore(str(tmp_path)).collect_packs()
    assert pack_a <= set(packs_in(tmp_path)), "a pack a pending save references was collected"
    w.seal()
    res = pending.result()
    w.close()
    assert set(list_checkpoints(tmp_path)[-1].manifest["packs"]) == pack_a
    verify_checkpoint(res.path)
    assert torch.equal(load_checkpoint(res.path)["state_dict"]["f"], f)
    LocalStore(str(tmp_path)).collect_packs()  # the pending save's hold is released: A is kept as referenced, no more
    assert set(packs_in(tmp_path)) == pack_a


def test_a_copy_into_the_store_cut_short_by_a_crash_is_removed_by_the_next_collection(tmp_path):
    """A pull killed while it copied a pack into ``.blobs`` leaves its temp file there (found by the kill -9
    campaign, restore.mid_pack_copy): the next collection removes it when its process is gone, and only then."""
    import subprocess

    from lightning_ckpt.store.base import SEP, TMP_PREFIX, host_id, owner_token

    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path, async_save=False)
    w.save(state(model, opt), step=0, stable=STABLE)
    w.close()
    (pack,) = packs_in(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / mf.BLOBS / f"{TMP_PREFIX}{pack}{SEP}{host_id()}.{gone.pid}{SEP}0123"
    live = tmp_path / mf.BLOBS / f"{TMP_PREFIX}{pack}{SEP}{owner_token()}{SEP}4567"  # a copy under way
    for p in (dead, live):
        p.write_bytes(b"half a pack")
    assert LocalStore(str(tmp_path)).collect_packs(dry_run=True) == ([], 0)
    assert dead.exists()  # a dry run removes nothing
    LocalStore(str(tmp_path)).collect_packs()
    assert not dead.exists() and live.exists()
    assert packs_in(tmp_path) == [pack]
    verify_checkpoint(list_checkpoints(tmp_path)[0].path)


def test_lineage_shows_runs_whose_recorded_parents_form_a_cycle(tmp_path):
    """Two runs each recorded as branched from the other's checkpoint (hand-edited records): both are shown, as
    roots, and nothing loops."""
    w = CheckpointWriter(tmp_path, async_save=False)
    for step, run, parent in ((1, "aaaaaaaaaaaa", "step=000002"), (2, "bbbbbbbbbbbb", "step=000001")):
        w.save({"state_dict": {"w": torch.full((4,), float(step))}}, step=step,
               meta={"lineage": {"run": run, "run_name": None, "parent": parent, "branch": True}})
    w.close()
    roots = lineage(str(tmp_path))
    shown = [r.run for r in roots] + [c.run for r in roots for c in r.children]
    assert sorted(shown) == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]


def test_merge_convert_and_export_read_the_shared_bytes_of_a_deduplicated_checkpoint(tmp_path):
    """The tools that copy weights out (merge to one safetensors file, convert to a Lightning .ckpt, the final-model
    export) take the frozen tensors from the content store, byte for byte."""
    from safetensors.torch import load_file

    from lightning_ckpt.tools.convert import convert_to_lightning
    from lightning_ckpt.tools.export import export_checkpoint
    from lightning_ckpt.tools.merge import merge_checkpoint

    torch.manual_seed(3)
    model = FineTune(96)
    opt = torch.optim.Adam(model.head.parameters())
    d = tmp_path / "ckpts"
    w = CheckpointWriter(d, async_save=False)
    for step in (1, 2):
        train_step(model, opt)
        w.save(state(model, opt), step=step, stable=STABLE)
    w.close()
    last = list_checkpoints(d)[-1]
    assert last.manifest["packs"] and "state_dict/frozen.weight" not in str(last.manifest["files"])
    want = model.state_dict()
    res = merge_checkpoint(last.path, str(tmp_path / "model.safetensors"))
    merged = {}
    for f in res.files:
        merged.update(load_file(f))
    for k, v in want.items():
        assert torch.equal(merged[k], v), k
    ckpt = torch.load(convert_to_lightning(last.path, tmp_path / "model.ckpt"), weights_only=True)
    for k, v in want.items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    out = export_checkpoint(last.path, str(tmp_path / "export"))
    files = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors")]
    exported = {}
    for f in files:
        exported.update(load_file(f))
    for k, v in want.items():
        assert torch.equal(exported[k], v), k


def test_a_deletion_collects_the_content_store_only_when_it_orphaned_a_pack(tmp_path, monkeypatch):
    """Retention of a run whose checkpoints share a pack (a frozen backbone) deletes one checkpoint per save; the
    collection reads every manifest of the folder, so it runs when a pack the deleted manifests referenced is
    referenced by none left (then at once), and otherwise only every ``sweep_every`` deletion passes."""
    from lightning_ckpt.folder import Folder, Plan

    calls = {"n": 0}
    real = LocalStore.collect_packs

    def counted(self, **kw):
        calls["n"] += 1
        return real(self, **kw)

    monkeypatch.setattr(LocalStore, "collect_packs", counted)
    d = tmp_path / "ckpts"
    _fit(d, 40)  # a save every 2 steps, keep_last=2: 18 deletions, the pack shared by all
    assert [c.name for c in list_checkpoints(d)] == ["step=000038", "step=000040"]
    assert 1 <= calls["n"] <= 2  # every 16th pass, not 18
    shared = set(packs_in(d))
    assert len(shared) == 1
    for c in list_checkpoints(d):
        verify_checkpoint(c.path)

    # the writer's own folder: A shared by steps 0 and 1, B (every stable tensor changed) by step 2 only
    model = FineTune()
    opt = torch.optim.Adam(model.head.parameters())
    w = CheckpointWriter(tmp_path / "w", async_save=False)
    for step in (0, 1):
        w.save(state(model, opt), step=step, stable=STABLE)
    with torch.no_grad():
        for t in (model.frozen.weight, model.frozen.bias, model.stats):
            t.add_(1.0)
    w.save(state(model, opt), step=2, stable=STABLE)
    w.close()
    ckpts = list_checkpoints(tmp_path / "w")
    pack_a = set(ckpts[0].manifest["packs"]) - set(ckpts[2].manifest["packs"])
    assert pack_a and pack_a <= set(packs_in(tmp_path / "w"))
    folder = Folder(str(tmp_path / "w"))
    calls["n"] = 0
    folder.apply(Plan(ckpts, {"step=000000": "test"}))  # step 1 still references A: no collection
    assert calls["n"] == 0 and pack_a <= set(packs_in(tmp_path / "w"))
    folder.apply(Plan(list_checkpoints(tmp_path / "w"), {"step=000001": "test"}))  # A orphaned: collected now
    assert calls["n"] == 1 and not pack_a & set(packs_in(tmp_path / "w"))
    verify_checkpoint(list_checkpoints(tmp_path / "w")[0].path)
