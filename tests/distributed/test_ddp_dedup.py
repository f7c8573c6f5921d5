"""Deduplicated checkpoints of a 2-rank DDP fine-tune (gloo, torchrun): the frozen layers are written into the
folder's content store once, by the first save, and every later checkpoint (after retention, after a 2-rank
``fit(ckpt_path=...)``, after resharding from one process to two) references that one pack set; the checkpoints
verify, load in one process and resume there (2 -> 1), in sharded and in rank0 mode."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import PeriodicCheckpoint, RetentionPolicy, latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from lightning_ckpt.demo import DemoModel
from lightning_ckpt.store.blobs import BlobStore

from support import TESTS, data, trainer
from support.shared import two_ranks

pytestmark = pytest.mark.usefixtures("forkserver")

SCRIPT = os.path.join(TESTS, "distributed", "dedup_script.py")
MODEL_KW = {"hidden": 96, "layers": 3, "frozen_layers": 2}  # as in dedup_script.py
FROZEN = ["state_dict/net.0.weight", "state_dict/net.0.bias", "state_dict/net.3.weight", "state_dict/net.3.bias"]


def _one_process_fine_tune(d) -> None:
    """Step 2 of the same fine-tune, saved by a single process into the folder the 2-rank run then resumes."""
    from lightning.pytorch import seed_everything

    seed_everything(3, verbose=False)
    folder = str(d / "ckpts")
    t = trainer([PeriodicCheckpoint(folder, every_n_train_steps=2)], val_every=None, max_steps=2,
                num_sanity_val_steps=0)
    t.fit(DemoModel(**MODEL_KW), data(n_train=128))
    (d / "one-process-packs.json").write_text(json.dumps(BlobStore(folder).names()))


# the session's shared 2-rank launch (support.shared): each fixture's value is the run's folder
ddp_dedup = two_ranks("ddp_dedup", SCRIPT, lambda d: ["--dir", d / "ckpts", "--out", d / "info.json"])
ddp_dedup_rank0 = two_ranks("ddp_dedup_rank0", SCRIPT, lambda d: [
    "--dir", d / "ckpts", "--out", d / "info.json", "--mode", "rank0", "--start-from", d / "ckpts"],
    prepare=_one_process_fine_tune)


def frozen_bytes() -> int:
    model = DemoModel(**MODEL_KW)
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def check_run(d, mode: str) -> tuple[dict, set[str]]:
    """What both modes guarantee; returns the run's info and its pack set."""
    info = json.loads((d / "info.json").read_text())
    assert info["world_size"] == 2 and info["steps"] == [6, 10]
    assert info["resumed_from"].endswith("step=000006")  # the second fit: fit(ckpt_path=...) on two ranks
    folder = str(d / "ckpts")
    ckpts = list_checkpoints(folder)
    # RetentionPolicy(keep_last=2), and the checkpoint the second fit resumed from (protected while it runs)
    assert [c.step for c in ckpts] == [6, 8, 10]
    packs = set(BlobStore(folder).names())  # what retention's collections left in the content store
    assert packs
    for c in ckpts:
        m = c.manifest
        assert m["world_size"] == 2 and m["mode"] == mode and m["format_version"] == 2
        assert set(m["packs"]) == packs, f"{c.name} references {sorted(m['packs'])}, the store holds {sorted(packs)}"
        for k in FROZEN:  # the frozen layers live in the packs, nothing else of the model or optimizer does
            assert all("pack" in ch for ch in m["tensors"][k]["chunks"]), (c.name, k)
        in_packs = {k for k, t in m["tensors"].items() if any("pack" in ch for ch in t["chunks"])}
        assert in_packs == set(FROZEN), (c.name, sorted(in_packs))
        assert not any(k in FROZEN for f in m["files"].values() for k in f.get("tensors", {}))
        verify_checkpoint(c.path)  # every byte, the packs included
    assert ckpts[1].manifest["resumed_from"].endswith("step=000006")
    # bytes each save wrote (SaveResult.bytes): the first save of the run wrote the frozen layers (its pack), no later
    # one did, not even the first save of the second fit (a new Trainer, resumed on two ranks)
    b1, b2 = ({int(k): v for k, v in b.items()} for b in info["bytes"])
    wrote = {**b1, **b2}
    first = 2 if mode == "sharded" else None  # rank0: the first fit resumed a single process's step 2
    assert sorted(wrote) == ([2] if first else []) + [4, 6, 8, 10], info["bytes"]
    own = {c.step: sum(int(f["size"]) for f in c.manifest["files"].values()) for c in ckpts}
    for step, size in own.items():
        assert wrote[step] == size, f"save {step} wrote {wrote[step]} bytes, its own files are {size}: it wrote a pack"
    pack_bytes = sum(int(e["size"]) for e in ckpts[-1].manifest["packs"].values())
    assert pack_bytes >= frozen_bytes()
    later = [b for step, b in wrote.items() if step != first]
    assert max(later) < min(own.values()) + 0.5 * frozen_bytes(), (wrote, own)  # save 4 too (deleted since)
    if first:
        assert wrote[first] > max(later) + 0.9 * pack_bytes, (wrote, pack_bytes)
    # the model a 2-rank fit ended with is what the newest checkpoint holds
    final = load_file(str(d / "info.json.safetensors"))
    got = load_checkpoint(ckpts[-1].path)["state_dict"]
    assert final.keys() == got.keys()
    for k in final:
        assert torch.equal(final[k], got[k]), k
    return info, packs


def test_ddp_fine_tune_writes_the_frozen_layers_once_into_one_pack_set(ddp_dedup):
    _, packs = check_run(ddp_dedup, "sharded")
    # one save wrote them all (each rank its share of the replicated state): the first save of the first fit
    assert len({p.rsplit("-rank", 1)[0] for p in packs}) == 1 and all("-1-rank" in p for p in packs), packs


def test_ddp_rank0_mode_resumes_a_one_process_fine_tune_and_shares_its_pack(ddp_dedup_rank0):
    info, packs = check_run(ddp_dedup_rank0, "rank0")
    assert info["first_from"].endswith("step=000002")  # resharding 1 -> 2: the single process's checkpoint
    # the 2-rank saves found the frozen bytes in the single process's pack (by content hash) and wrote none
    assert packs == set(json.loads((ddp_dedup_rank0 / "one-process-packs.json").read_text()))


def test_ddp_deduplicated_checkpoint_resumes_in_one_process(ddp_dedup, tmp_path):
    """Resharding 2 -> 1: a single-process Trainer resumes the 2-rank deduplicated checkpoint, in its folder (the
    run goes on sharing the pack) and with its model and optimizer."""
    folder = str(tmp_path / "ckpts")
    shutil.copytree(ddp_dedup / "ckpts", folder)  # the run's folder is shared by the tests of this module
    src = latest_checkpoint(folder)
    saved = load_checkpoint(src)["state_dict"]
    model = DemoModel(**MODEL_KW)
    cbs = [PeriodicCheckpoint(folder, every_n_train_steps=2, allow_existing=True), RetentionPolicy(folder, keep_last=2)]
    t = trainer(cbs, val_every=None, max_steps=12, num_sanity_val_steps=0)
    t.fit(model, data(n_train=128), ckpt_path=src)
    assert t.global_step == 12
    opt_state = t.optimizers[0].state_dict()["state"]
    assert opt_state and all(int(s["step"]) == 12 for s in opt_state.values())
    for k in FROZEN:
        name = k.split("/", 1)[1]
        assert torch.equal(model.state_dict()[name], saved[name]), k
    newest = list_checkpoints(folder)[-1]
    assert newest.step == 12 and newest.manifest["world_size"] == 1 and newest.manifest["resumed_from"] == src
    verify_checkpoint(newest.path)
    packs = set(BlobStore(folder).names())
    assert set(newest.manifest["packs"]) == packs and all("-1-rank" in p for p in packs)
