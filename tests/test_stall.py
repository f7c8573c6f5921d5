"""The training stall of a background save (issue 22): ``save()`` reads on the training thread only what training may
change (the bytes, copied in bulk; the version counters and data pointers deduplication needs), and leaves the rest
to the background thread (the state document's encoding, the signatures' other parts, the spot checks, the reuse
decisions). None of it may change what is saved: the state at the moment of ``save()``, even when training changes
every tensor right after it returns and before the background thread looks at them, and the same reuse decisions."""
from __future__ import annotations

import threading

import torch

from lightning_ckpt import list_checkpoints, load_checkpoint, verify_checkpoint
from lightning_ckpt.dcp import is_model_or_optim
from lightning_ckpt.format.codec import encode
from lightning_ckpt.writer import CheckpointWriter
from lightning_ckpt.writer.dedup import Deduper

N = 2000
STABLE = [f"state_dict/layer{i}.weight" for i in range(100)]  # frozen: never changed


def model(n: int) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(n)}


def check(folder, expected: list[dict]) -> list:
    ckpts = list_checkpoints(folder)
    assert len(ckpts) == len(expected)
    for c, exp in zip(ckpts, expected):
        got = load_checkpoint(c.path)["state_dict"]
        assert got.keys() == exp.keys()
        bad = [k for k in exp if not torch.equal(got[k], exp[k])]
        assert not bad, (c.name, bad[:5])
    return ckpts


def reused(c) -> set[str]:
    return {k for k, t in c.manifest["tensors"].items() if any("pack" in ch for ch in t["chunks"])}


def test_a_background_save_keeps_the_state_at_save_when_training_changes_every_tensor_before_it_runs(tmp_path):
    """2,000 tensors, deduplicated: each save is held back in the writer's thread until training changed every
    trainable tensor (and, once, one of them through ``.data``, which skips the version counter), so the background
    thread sees only later values; the checkpoints hold the values at each save(), and a tensor changed after a save
    is never reused from the store afterwards."""
    sd = model(N)
    w = CheckpointWriter(tmp_path, async_save=True)
    expected, trainable = [], list(sd.values())[100:]

    def save(step: int, change) -> None:
        gate = threading.Event()
        w._executor.submit(gate.wait)  # the save's job runs after this: after training changed the tensors
        p = w.save({"state_dict": sd, "global_step": step}, step=step, stable=STABLE)
        expected.append({k: t.clone() for k, t in sd.items()})
        change()
        gate.set()
        p.result()

    def bump() -> None:
        for t in trainable:
            t.add_(1)

    try:
        save(1, lambda: None)  # frozen ones into the pack
        save(2, lambda: None)  # unchanged since 1: the trainable ones into a pack
        save(3, bump)  # unchanged since 2 (reused), changed right after the save returned
        save(4, lambda: None)  # changed since 3: written again, not reused from 2's pack
        save(5, lambda: sd["layer7.weight"].data.mul_(-1))  # unchanged since 4 (reused); .data: no version change
        save(6, lambda: None)
    finally:
        w.close()
    c = check(tmp_path, expected)
    keys = {f"state_dict/{k}" for k in sd}
    assert reused(c[0]) == set(STABLE)
    assert reused(c[2]) == keys  # everything reused (save 3)
    assert reused(c[3]) == set(STABLE)  # save 4: the trainable ones were changed after save 3
    assert reused(c[4]) == keys  # save 5: unchanged since 4, the trainable ones into a pack
    # save 6: layer7 was changed through .data after save 5: its spot check (on save 6's snapshot) saw it, and it went
    # into save 6's own pack rather than being referenced in save 5's
    pack_of = [c[i].manifest["tensors"]["state_dict/layer7.weight"]["chunks"][0]["pack"] for i in (4, 5)]
    assert pack_of[0] != pack_of[1]
    verify_checkpoint(c[-1].path)


def test_small_and_large_tensors_keep_their_order_and_values_when_the_layout_changes(tmp_path):
    """The bulk copy's layout is checked in bulk: a changed shape, dtype or device-independent key set between saves
    lays it out again; large tensors are copied one by one next to it; the state's order is kept."""
    sd = {f"s{i}": torch.randn(5) for i in range(200)}
    sd["big"] = torch.randn(40000)  # 160 KB: its own buffer
    w = CheckpointWriter(tmp_path, async_save=True)
    expected = []
    try:
        for step, change in enumerate((
            lambda: None,
            lambda: sd.__setitem__("s3", torch.randn(6)),  # another shape
            lambda: sd.__setitem__("s4", torch.arange(5, dtype=torch.int64)),  # another dtype
            lambda: sd.__setitem__("s4", sd["s4"].view(5, 1)),  # same numel, another shape
            lambda: sd.__setitem__("new", torch.ones(2)),  # one more key
            lambda: sd.pop("s10"),
        )):
            change()
            p = w.save({"state_dict": sd}, step=step, sync=step == 2)
            expected.append({k: t.clone() for k, t in sd.items()})
            for t in sd.values():
                t.add_(1)
            p.result()
    finally:
        w.close()
    for c in check(tmp_path, expected):
        assert list(load_checkpoint(c.path)["state_dict"]) == list(expected[c.step]), c.name


def test_the_background_signatures_match_those_taken_on_the_training_thread(tmp_path):
    """A rank that does not commit leaves out what it already stored: planned in the background (``observe`` then
    ``finish``) it leaves out the same tensors as planned on the training thread (``follower_plan``)."""
    sd = {f"state_dict/w{i}": torch.randn(4) for i in range(300)}
    keys, vals = list(sd), list(sd.values())
    d = Deduper(str(tmp_path), fsync=False, is_shared=is_model_or_optim)
    plan = d.plan({}, (), leader=False)
    d.observe(plan, keys, vals, ())
    assert d.finish(plan, {k: v.clone() for k, v in sd.items()}, leader=False) == set()
    d.follower_saw(plan, (keys[:50], keys[50:100]))
    vals[3].add_(1)
    vals[70].data.add_(1)  # the version counter does not move: the leader's spot check decides, not the follower
    plan = d.plan({}, (), leader=False)
    d.observe(plan, keys, vals, ())
    skip = d.finish(plan, {k: v.clone() for k, v in sd.items()}, leader=False)
    assert skip == d.follower_plan(sd) == set(keys[:100]) - {keys[3]}
    d.close()


def test_encode_with_a_cache_gives_what_encode_without_one_gives():
    cache: dict = {}
    t = [torch.zeros(1) for _ in range(5)]
    states = [
        {"sd": {"a": t[0], "b/c": t[1], "d~e": t[2]}, "n": 1},
        {"sd": {"a": t[0], "b/c": t[1], "d~e": t[3]}, "n": 2},  # same keys, another tensor
        {"sd": {"a": t[0], "x": t[1]}, "n": 3},  # other keys
        {"sd": {"a": t[0], 1: t[1]}, "n": 4},  # a key that is not a string
        {"sd": {"a": t[0], "$b": t[1]}},  # a key that looks like a tag
        {"sd": {"a": t[0], "b": 2}},  # not only tensors
        {"sd": {"a": t[4], "b": torch.nn.Parameter(t[1])}},
        {"a": t[0], "b/": t[1]},  # at the top
    ]
    for key_fn in (None, lambda k: "r1/" + k):
        for s in states:
            doc, tensors = encode(s, key_fn=key_fn, cache=cache)
            doc0, tensors0 = encode(s, key_fn=key_fn)
            assert doc == doc0 and list(tensors) == list(tensors0)
            assert all(tensors[k] is tensors0[k] for k in tensors)
        cache.clear()
