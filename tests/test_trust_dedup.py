"""Trust in the content store (issue 19): a reuse of stored bytes is proven by content that this process computed,
never taken from a manifest's word; ``verify`` and every load check a packed tensor's content hash as well as its
CRC32C; entries of ``.blobs`` that are not regular files are never read or deleted as packs and never stop a
collection; conjugate and negative views are saved alike in every mode, nested tensors refused alike; the model file
of a standalone export holds the whole model."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lightning_ckpt import CheckpointWriter, list_checkpoints, load_checkpoint, verify_checkpoint
from lightning_ckpt.errors import CheckpointCorruptError
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.format.checksum import content_hash
from lightning_ckpt.format.tensorfile import byte_view
from lightning_ckpt.store.blobs import BlobStore


def packs_in(d) -> list[str]:
    return BlobStore(str(d)).names()


def rewrite_manifest(path: str, edit) -> None:
    """Edit a committed manifest and seal it with a fresh digest (a forgery that passes the digest check)."""
    p = os.path.join(path, mf.MANIFEST)
    with open(p, "rb") as f:
        m = json.loads(f.read())
    edit(m)
    with open(p, "wb") as f:
        f.write(mf.dumps(m))


# ------------------------------------------------------------------ .blobs entries of the wrong type
def test_entries_of_blobs_that_are_not_regular_files_are_never_read_or_deleted_and_never_stop_a_collection(tmp_path):
    from lightning_ckpt.policy.retention import RetentionRules
    from lightning_ckpt.tools.prune import prune

    f, t = torch.randn(64), torch.randn(8)
    w = CheckpointWriter(tmp_path, async_save=False)
    w.save({"state_dict": {"f": f, "t": t}}, step=0, stable=["state_dict/f"])
    f.mul_(-1.0)  # step 1 packs f anew: step 0's pack is referenced by step 0 alone
    w.save({"state_dict": {"f": f, "t": t}}, step=1, stable=["state_dict/f"])
    w.close()
    old, new = list_checkpoints(tmp_path)
    (old_pack,) = old.manifest["packs"]
    blobs = tmp_path / mf.BLOBS
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not a pack")
    strays = {
        "pack-0badc0de-1-rank00000.safetensors": lambda p: p.mkdir(),
        "pack-0badc0de-2-rank00000.safetensors": lambda p: os.mkfifo(p),
        "pack-0badc0de-3-rank00000.safetensors": lambda p: p.symlink_to(outside),
        "pack-0badc0de-4-rank00000.safetensors": lambda p: p.symlink_to(tmp_path / "nowhere"),
        "pack-0badc0de-5-rank00000.safetensors": lambda p: p.symlink_to(blobs / old_pack),
    }
    for n, make in strays.items():
        make(blobs / n)
    assert sorted(packs_in(tmp_path)) == sorted([old_pack, *new.manifest["packs"]])  # only regular files are packs
    report = prune(str(tmp_path), RetentionRules(keep_last=1))  # deletes step 0, then collects its pack
    assert [os.path.basename(d["path"]) for d in report.deleted] == [old.name]
    assert [os.path.basename(p["path"]) for p in report.packs] == [old_pack]
    for n in strays:
        assert os.path.lexists(blobs / n), f"{n} was deleted"
    assert outside.read_bytes() == b"not a pack"
    verify_checkpoint(new.path)
    # a new writer's content index ignores them too
    w = CheckpointWriter(tmp_path, async_save=False)
    res = w.save({"state_dict": {"f": f, "t": t}}, step=2, stable=["state_dict/f"]).result()
    w.close()
    verify_checkpoint(res.path)
    assert torch.equal(load_checkpoint(res.path)["state_dict"]["f"], f)


# ------------------------------------------------------------------ reuse proven by content
def _forge_hash(ckpt_path: str, key: str, claimed: torch.Tensor) -> None:
    """Claim in the checkpoint's manifest that the packed tensor ``key`` has ``claimed``'s content hash (CRCs left
    alone, digest recomputed: the manifest still passes every check but the content hash's)."""
    def edit(m):
        c = m["tensors"][key]["chunks"][0]
        m["packs"][c["pack"]]["tensors"][c["name"]]["xxh128"] = content_hash(byte_view(claimed))
    rewrite_manifest(ckpt_path, edit)


def test_a_forged_content_hash_never_makes_a_save_reference_the_wrong_bytes(tmp_path):
    """A manifest claims that a stored tensor has the content hash of another tensor. Before: the next process's save
    of that other tensor referenced the stored bytes instead, and its checkpoint verified and loaded the wrong
    weights. Now the reuse is proven by reading the bytes, and verify and load refuse the forged record."""
    torch.manual_seed(0)
    f, g = torch.randn(256), torch.randn(256)
    w = CheckpointWriter(tmp_path, async_save=False)
    w.save({"state_dict": {"w": f}}, step=1, stable=["state_dict/w"])
    w.close()
    (a,) = list_checkpoints(tmp_path)
    _forge_hash(a.path, "state_dict/w", claimed=g)
    with pytest.raises(CheckpointCorruptError, match="content hash"):
        verify_checkpoint(a.path)
    from lightning_ckpt.cli import main

    assert main(["verify", a.path]) != 0
    with pytest.raises(CheckpointCorruptError, match="content hash"):
        load_checkpoint(a.path)
    with pytest.raises(CheckpointCorruptError, match="content hash"):
        load_checkpoint(a.path, verify=True)
    assert torch.equal(load_checkpoint(a.path, verify=False)["state_dict"]["w"], f)  # the CRCs alone pass
    from lightning_ckpt.tools.merge import merge_checkpoint
    from lightning_ckpt.tools.standalone import export_standalone

    with pytest.raises(CheckpointCorruptError, match="content hash"):
        merge_checkpoint(a.path, str(tmp_path / "merged.safetensors"))
    with pytest.raises(CheckpointCorruptError, match="content hash"):
        export_standalone(a.path, tmp_path / "copy")
    assert not os.path.exists(tmp_path / "copy" / a.name)

    w = CheckpointWriter(tmp_path, async_save=True)  # a resumed process: finds "g" in a's pack by its forged hash
    res = w.save({"state_dict": {"w": g}}, step=2, stable=["state_dict/w"]).result()
    again = w.save({"state_dict": {"w": g}}, step=3, stable=["state_dict/w"]).result()
    w.close()
    for r in (res, again):
        verify_checkpoint(r.path)
        assert torch.equal(load_checkpoint(r.path)["state_dict"]["w"], g)
        assert not set(list_checkpoints(tmp_path)[-1].summary["packs"]) & set(a.summary["packs"])


def test_an_honest_pack_found_by_hash_is_read_back_once_and_reused(tmp_path, monkeypatch):
    """The proof costs one read of the pack per process; the packs this process wrote need none."""
    import lightning_ckpt.writer.dedup as dedup

    calls = []
    real = dedup.check_file
    monkeypatch.setattr(dedup, "check_file", lambda f, entry, where, *a, **k: (calls.append(where), real(f, entry, where, *a, **k)))
    f, t = torch.randn(256), torch.randn(8)
    w = CheckpointWriter(tmp_path, async_save=False)
    for step in (1, 2):
        t.add_(1.0)
        w.save({"state_dict": {"f": f, "t": t}}, step=step, stable=["state_dict/f"])
    w.close()
    assert calls == []  # its own pack: known, never read back
    (pack,) = packs_in(tmp_path)
    w = CheckpointWriter(tmp_path, async_save=False)
    for step in (3, 4, 5):
        t.add_(1.0)
        res = w.save({"state_dict": {"f": f, "t": t}}, step=step, stable=["state_dict/f"]).result()
    w.close()
    assert [os.path.basename(c) for c in calls] == [pack]
    assert packs_in(tmp_path) == [pack]
    assert set(list_checkpoints(tmp_path)[-1].manifest["packs"]) == {pack}
    verify_checkpoint(res.path)


# ------------------------------------------------------------------ conjugate and negative views, nested tensors
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "plain"])
def test_conjugate_and_negative_views_are_saved_alike_and_nested_tensors_refused_alike(tmp_path, async_save, dedup):
    """Before: a sync save of ``z.conj()`` failed with a torch RuntimeError while a background one round-tripped it,
    and with dedup the second background save stopped training with a RuntimeError; a nested tensor failed with a
    different raw error in each mode. Now every mode stores the views' values, and refuses a nested tensor at the
    first save with one clear ValueError, the writer still usable after it."""
    z = torch.randn(16, dtype=torch.complex64)
    r = torch.randn(16)
    w = CheckpointWriter(tmp_path, async_save=async_save, dedup=dedup)

    def sd():
        return {"conj": z.conj(), "neg": z.conj().imag, "negview": torch._neg_view(r), "plain": r}

    stable = [f"state_dict/{k}" for k in sd()]
    for step in range(3):
        res = w.save({"state_dict": sd()}, step=step, stable=stable).result()
        got = load_checkpoint(res.path)["state_dict"]
        for k, v in sd().items():
            assert not got[k].is_conj() and not got[k].is_neg()
            assert torch.equal(got[k], v.resolve_conj().resolve_neg()), (step, k)
    for bad in (torch.nested.nested_tensor([torch.randn(3), torch.randn(5)]),
                torch.nested.nested_tensor([torch.randn(3), torch.randn(5)], layout=torch.jagged)):
        with pytest.raises(ValueError, match="nested tensor.*unbind"):
            w.save({"state_dict": {"n": bad, "plain": r}}, step=9, stable=["state_dict/n"])
    res = w.save({"state_dict": sd()}, step=10, stable=stable).result()  # the refusal left the writer usable
    w.close()
    verify_checkpoint(res.path)
    assert [c.step for c in list_checkpoints(tmp_path)] == [0, 1, 2, 10]


# ------------------------------------------------------------------ the model file of a standalone export
def test_the_model_file_of_a_standalone_export_alone_holds_the_whole_model(tmp_path, capsys):
    """With dedup, a checkpoint's own model file lacks what its packs hold (frozen parameters and buffers even in the
    first checkpoint; every unchanged tensor later). Before: ``export --standalone`` copied the packs as files of
    their own, so its ``model-rank00000.safetensors`` lacked them too. Now that one file is the whole state dict."""
    import shutil

    from safetensors.torch import load_file

    from lightning_ckpt.cli import main

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 2))
    model[0].requires_grad_(False)
    model[1].eval()  # its running statistics are buffers that stay as they are
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    stable = [f"state_dict/{k}" for k, v in model.state_dict().items() if not v.requires_grad]
    run, out = tmp_path / "run", tmp_path / "out"
    w = CheckpointWriter(run, async_save=False)
    expected = {}
    for step, train in ((0, False), (1, True), (2, False)):  # step 2: nothing changed, everything is in packs
        if train:
            model(torch.randn(4, 32)).sum().backward()
            opt.step()
            opt.zero_grad()
        res = w.save({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}, step=step,
                     stable=stable).result()
        expected[res.name] = {k: v.clone() for k, v in model.state_dict().items()}
    w.close()
    for c in list_checkpoints(run):
        own = os.path.join(c.path, "model-rank00000.safetensors")
        assert set(load_file(own) if os.path.exists(own) else {}) < set(expected[c.name])  # what the docs say
        assert main(["export", "--standalone", c.path, str(out)]) == 0
    shutil.rmtree(run)  # nothing of the source is left: no content store
    capsys.readouterr()
    for name, want in expected.items():
        files = os.listdir(out / name)
        assert "model-rank00000.safetensors" in files and not [f for f in files if f.startswith("pack-")], files
        got = load_file(str(out / name / "model-rank00000.safetensors"))
        assert set(got) == set(want), name
        for k, v in want.items():
            assert torch.equal(got[k], v), (name, k)
        verify_checkpoint(str(out / name))
        loaded = load_checkpoint(str(out / name))
        assert all(torch.equal(loaded["state_dict"][k], v) for k, v in want.items())
        m = json.loads((out / name / mf.MANIFEST).read_bytes())
        assert m["format_version"] == mf.PLAIN_VERSION and "packs" not in m


def test_a_pull_replaces_what_is_not_a_pack_under_a_packs_name_and_never_writes_through_a_link(tmp_path):
    """The copy of pulled packs into the local content store checked whether a pack was there with ``isfile``, which
    follows links: a link under the pack's name was kept, and the pulled checkpoint could not be read."""
    from lightning_ckpt.errors import CheckpointError
    from lightning_ckpt.store import LocalStore
    from lightning_ckpt.folder.transfer import _copy_packs

    src = tmp_path / "src"
    w = CheckpointWriter(src, async_save=False)
    res = w.save({"state_dict": {"f": torch.randn(64)}}, step=1, stable=["state_dict/f"]).result()
    w.close()
    packs = list_checkpoints(src)[0].manifest["packs"]
    (pack,) = packs
    cache = src / mf.BLOBS  # (stands for the S3 read cache the packs were downloaded into, checked)
    dest = tmp_path / "dest"
    (dest / mf.BLOBS).mkdir(parents=True)
    (dest / "elsewhere").write_bytes(b"x" * int(packs[pack]["size"]))
    (dest / mf.BLOBS / pack).symlink_to(dest / "elsewhere")
    _copy_packs(str(cache), LocalStore(dest), packs)
    assert not os.path.islink(dest / mf.BLOBS / pack)
    assert (dest / mf.BLOBS / pack).read_bytes() == (cache / pack).read_bytes()
    assert (dest / "elsewhere").read_bytes() == b"x" * int(packs[pack]["size"])
    (dest / mf.BLOBS / pack).unlink()
    (dest / mf.BLOBS / pack).mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        _copy_packs(str(cache), LocalStore(dest), packs)
    other = tmp_path / "other"
    (other / "real").mkdir(parents=True)
    (other / mf.BLOBS).symlink_to(other / "real")
    with pytest.raises(CheckpointError, match="not a folder"):
        _copy_packs(str(cache), LocalStore(other), packs)
    assert not os.listdir(other / "real")
