"""States of many small tensors (issue 22, the tensor-count half): 20,000 tensors saved (synchronously and in the
background), loaded, verified and merged in one process; the same saved by two ranks through the plain path
(replicated state split across ranks, a fixed number of collectives per save whatever the count) and loaded in one
process (2 -> 1); the compact manifest (format version 3): its size, its round trip, hostile edits of its columns;
and a checkpoint of the previous format (version 1, written by the release before) that still loads."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import load_checkpoint, merge_checkpoint, verify_checkpoint
from lightning_ckpt.errors import CheckpointCorruptError
from lightning_ckpt.format import manifest as mf
from lightning_ckpt.read import read_checkpoint_manifest
from lightning_ckpt.writer import CheckpointWriter

from support import TESTS
from support.shared import two_ranks

pytestmark = pytest.mark.usefixtures("forkserver")

N = 20000
SCRIPT = os.path.join(TESTS, "distributed", "many_tensors_script.py")
FIXTURE = pathlib.Path(TESTS) / "fixtures" / "format-v1" / "step=000001"

many_tensors = two_ranks("many_tensors", SCRIPT, lambda d: ["--dir", d / "ckpts", "--out", d / "info.json",
                                                            "--n", str(N)])


def model(n: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.arange(3, dtype=torch.float32) + i + shift for i in range(n)}


def background_saves(folder: str, sd: dict, steps: tuple[int, ...], extra: dict | None = None) -> tuple[str, int]:
    """Background saves of ``sd``, each changed right after its save returned; the last path and how many host buffers
    the writer allocated."""
    w = CheckpointWriter(folder, async_save=True, dedup=False)
    try:
        for step in steps:
            p = w.save({"state_dict": sd, **({"extra": extra} if extra else {})}, step=step)
            for t in sd.values():  # training goes on while the save is written: the checkpoint keeps the values
                t.add_(1000)
            path = p.result().path
            for t in sd.values():
                t.sub_(1000)
        return path, w._buffers.allocations
    finally:
        w.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A background save of 20,000 tensors of three floats (plus a few of other dtypes), changed right after the save
    returned."""
    extra = {"ids": torch.arange(5), "half": torch.ones(3, dtype=torch.bfloat16)}
    path, allocations = background_saves(str(tmp_path_factory.mktemp("many")), model(N), (1,), extra)
    assert allocations == 3  # one buffer per dtype (float32, int64, bfloat16) for all 20,002 tensors: one bulk copy
    return path


def test_the_host_buffers_of_many_small_tensors_are_reused(tmp_path):
    sd = model(500)
    path, allocations = background_saves(str(tmp_path), sd, (1, 2, 3))
    assert allocations == 1  # laid out by the first save, reused by the next two
    out = load_checkpoint(path)["state_dict"]
    assert all(torch.equal(out[k], v) for k, v in sd.items())


def test_20000_tensors_save_load_verify_merge(saved, tmp_path):
    m = read_checkpoint_manifest(saved)
    assert m["format_version"] == mf.COMPACT_VERSION and len(m["tensors"]) == N + 2
    size = os.path.getsize(os.path.join(saved, mf.MANIFEST))
    assert size / N < 120, f"{size / N:.0f} bytes per tensor in the manifest"  # version 1: about 425
    out = load_checkpoint(saved)
    want = model(N)
    assert set(out["state_dict"]) == set(want)
    assert all(torch.equal(out["state_dict"][k], v) for k, v in want.items())
    assert torch.equal(out["extra"]["ids"], torch.arange(5)) and out["extra"]["half"].dtype == torch.bfloat16
    verify_checkpoint(saved)
    res = merge_checkpoint(saved, str(tmp_path / "model.safetensors"))
    merged = load_file(res.files[0])
    assert len(merged) == N and torch.equal(merged["layer19999.weight"], want["layer19999.weight"])


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    """A synchronous save of 300 tensors: the compact layout starts at 256 (mf.COMPACT_FROM)."""
    d = tmp_path_factory.mktemp("small")
    w = CheckpointWriter(str(d), async_save=False, dedup=False)
    r = w.save({"state_dict": model(300)}, step=1).result()
    w.close()
    return r.path


def test_compact_manifest_round_trips_and_refuses_hostile_columns(small):
    raw = (pathlib.Path(small) / mf.MANIFEST).read_bytes()
    m = mf.parse_manifest(raw, "m")
    assert mf.dumps(m) == raw  # parsing gives the version 1/2 structure back exactly: writing it again is identical
    assert b"\n" not in raw and b'"begin"' not in raw  # no indent; offsets follow from the order

    def damaged(edit) -> bytes:
        body = json.loads(raw)
        del body[mf.DIGEST]
        edit(body)
        text = json.dumps(body, separators=(",", ":")).encode()
        import hashlib
        return text[:-1] + b',"%s":"%s"}' % (mf.DIGEST.encode(), hashlib.sha256(text).hexdigest().encode())

    cols = lambda b: b["files"]["model-rank00000.safetensors"]["columns"]  # noqa: E731
    edits = {
        "columns of different lengths": lambda b: cols(b)["crc32c"].pop(),
        "an unknown dtype": lambda b: cols(b)["dtype"].__setitem__(7, "Q99"),
        "a negative dimension": lambda b: cols(b)["shape"].__setitem__(3, [-3]),
        "a shape the file size does not fit": lambda b: cols(b)["shape"].__setitem__(3, [4]),
        "an index key claimed twice": lambda b: cols(b)["key"].__setitem__(1, cols(b)["key"][0]),
        "a repeated tensor name": lambda b: cols(b)["name"].__setitem__(1, cols(b)["name"][0]),
        "an index key also listed explicitly": lambda b: b["tensors"].__setitem__(cols(b)["key"][0], {
            "dtype": "F32", "shape": [3], "chunks": [{"file": "model-rank00000.safetensors",
                                                      "name": cols(b)["name"][0], "offsets": [0], "sizes": [3]}]}),
    }
    for what, edit in edits.items():
        with pytest.raises(CheckpointCorruptError):
            mf.parse_manifest(damaged(edit), what)
    assert mf.parse_manifest(damaged(lambda b: None), "untouched")["tensors"] == m["tensors"]
    flipped = raw.replace(b'"step":1,', b'"step":2,')  # any change of the body breaks its digest
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        mf.parse_manifest(flipped, "edited")
    # a hand-edited manifest whose records cannot be columns is written as it is, and refused on reading
    bad = json.loads(json.dumps(m))
    rec = next(iter(bad["files"]["model-rank00000.safetensors"]["tensors"].values()))
    rec["end"] += 4
    with pytest.raises(CheckpointCorruptError):
        mf.parse_manifest(mf.dumps(bad), "hostile")


def test_two_ranks_save_20000_tensors_with_a_fixed_number_of_collectives(many_tensors):
    info = json.loads((many_tensors / "info.json").read_text())
    assert info["world_size"] == 2
    for per_rank in info["collectives"]:
        assert per_rank["1"] == per_rank["3"], per_rank  # 1,000 tensors, then 20,000
        assert sum(per_rank["3"].values()) <= 3
    folder = many_tensors / "ckpts"
    three = folder / "step=000003"  # saved in the background, changed right after the save returned
    sizes = [os.path.getsize(three / f"model-rank0000{r}.safetensors") for r in (0, 1)]
    assert min(sizes) > 0.4 * sum(sizes)  # each rank wrote about half of the replicated state
    verify_checkpoint(str(three))
    out = load_checkpoint(str(three), rank=1)  # 2 -> 1: one process reads both ranks' files
    want = model(N, 3.0)
    assert all(torch.equal(out["state_dict"][k], v) for k, v in want.items())
    assert out["rng"].tolist() == [1, 7]  # rank 1's own state


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path):
    raw = (FIXTURE / mf.MANIFEST).read_bytes()
    assert re.search(rb'"format_version": 1,', raw) and b'"begin"' in raw  # written by the release before
    dst = tmp_path / "step=000001"
    shutil.copytree(FIXTURE, dst)
    verify_checkpoint(str(dst))
    out = load_checkpoint(str(dst))
    assert out["epoch"] == 1 and len(out["state_dict"]) == 300
    assert torch.equal(out["state_dict"]["layer299.weight"], torch.tensor([299.0, 300.0]))


def test_a_run_holds_a_summary_of_each_listed_checkpoint_not_its_tensor_index(tmp_path):
    """A run keeps its folder's listing in memory (retention, best-k, the callbacks read it at every save). A manifest
    of many tensors is large once parsed (58 MB at 50,000), so the listing keeps each checkpoint's summary: every
    field but the per-tensor parts; ``CheckpointInfo.manifest`` still gives the whole manifest, read when asked."""
    import tracemalloc

    from lightning_ckpt import list_checkpoints
    from lightning_ckpt.store import LocalStore

    d = tmp_path / "many"
    w = CheckpointWriter(str(d), async_save=False, fsync=False)
    try:
        for step in range(1, 4):
            w.save({"state_dict": model(3000, shift=step), "global_step": step}, step=step).result()
        lock = LocalStore(str(d)).lock()  # held as a run holds it: the listing is kept in memory
        try:
            tracemalloc.start()
            try:
                held = list_checkpoints(str(d))  # reads every manifest once, and keeps the listing
                kept, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert [c.step for c in list_checkpoints(str(d))] == [1, 2, 3]  # from memory
        finally:
            lock.release()
    finally:
        w.close()
    assert kept < 1_000_000  # three parsed 3,000-tensor manifests: about 11 MB
    for c in held:
        assert "tensors" not in c.summary and all("tensors" not in f for f in c.summary["files"].values())
        assert c.summary["step"] == c.step and c.summary["files"]
    c = held[-1]
    assert set(c.manifest["tensors"]) == {f"state_dict/layer{i}.weight" for i in range(3000)}  # read when asked
    assert c.size_bytes == sum(int(f["size"]) for f in c.manifest["files"].values())
    # the manifest read when asked is the one listed: a checkpoint replaced under its name since is refused
    from lightning_ckpt.errors import CheckpointNotFoundError

    first = held[0]
    LocalStore(str(d)).delete(first.name)
    w = CheckpointWriter(str(d), async_save=False, fsync=False)
    try:
        w.save({"state_dict": model(3000, shift=9), "global_step": 1}, step=1).result()
    finally:
        w.close()
    with pytest.raises(CheckpointNotFoundError, match="replaced"):
        first.manifest
