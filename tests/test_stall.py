"""The training stall of a background save (issue 22): ``save()`` reads on the training thread only what training may
change (the bytes, copied in bulk; the version counters and data pointers deduplication needs), and leaves the rest
to the background thread (the state document's encoding, the signatures' other parts, the spot checks, the reuse
decisions). None of it may change what is saved: the state at the moment of ``save()``, even when training changes
every tensor right after it returns and before the background thread looks at them, and the same reuse decisions."""
from __future__ import annotations

import threading

import pytest
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


def train(live: dict) -> None:
    """A training step's changes to every tensor of ``live``, in place."""
    with torch.no_grad():
        for t in live.values():
            if t.dtype.is_floating_point or t.dtype.is_complex:
                t.mul_(-1.5)
            else:
                t.add_(3)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).clone()


def _same_bits(got: torch.Tensor, exp: torch.Tensor) -> bool:
    return got.dtype == exp.dtype and got.shape == exp.shape and torch.equal(_bits(got), _bits(exp))


def test_the_bulk_snapshot_follows_every_change_to_a_tensor_between_saves_bitwise(tmp_path):
    """The layout of the bulk copy is reused while the state's keys, dtypes and shapes stay the same (read in bulk by
    dense_views, not per tensor), whatever the tensors' storage. Between background saves, tensors are replaced by
    others, given another storage through ``.data``, resized in place, re-strided, reinterpreted as another dtype,
    reshaped over the same storage (``.data = t.data.view(...)``: same data pointer and version), turned into negative
    and conjugate views, grown out of the bulk copy; the state given as the same dict of the same tensor objects
    (a loop that keeps its own) or as fresh detached tensors at each save (as ``state_dict()`` gives them). Every
    checkpoint holds, bit for bit, the values, dtypes and shapes at its save(); an unchanged state is not laid out
    again (no buffer allocated)."""
    for fresh in (False, True):
        folder = tmp_path / ("fresh" if fresh else "same")
        live = {f"w{i}": torch.randn(5) for i in range(150)}
        live.update({f"z{i}": torch.randn(3, dtype=torch.complex64) for i in range(3)})
        live["p"] = torch.nn.Parameter(torch.randn(6))
        def do(*fs):
            return lambda: [f() for f in fs]

        changes = [
            lambda: None,
            lambda: None,  # unchanged: the layout is reused
            do(lambda: live.__setitem__("w1", torch.randn(5)),  # another tensor, same shape and dtype
               lambda: setattr(live["p"], "data", torch.randn(6))),  # another storage through .data
            do(lambda: live["w2"].resize_(7),  # resized in place
               lambda: live.__setitem__("w3", torch.randn(10)[::2])),  # same shape, strided
            lambda: setattr(live["p"], "data", live["p"].data.view(2, 3)),  # same pointer and version, new shape
            lambda: setattr(live["w4"], "data", live["w4"].data.view(torch.int32)),  # same bytes, another dtype
            do(lambda: live.__setitem__("w5", torch.randn(5, dtype=torch.complex64).conj().imag),  # a negative view
               lambda: live.__setitem__("z1", live["z1"].conj())),  # a conjugate view
            do(lambda: live.__setitem__("w5", torch.randn(5)),  # back to plain tensors
               lambda: live.__setitem__("z1", torch.randn(3, dtype=torch.complex64))),
            lambda: live["w6"].resize_(40000),  # 160 KB: out of the bulk copy
            lambda: None,
        ]
        w = CheckpointWriter(folder, async_save=True)
        expected, allocations = [], []
        try:
            for step, change in enumerate(changes):
                change()
                sd = {k: t.detach() for k, t in live.items()} if fresh else live
                p = w.save({"state_dict": sd}, step=step)
                expected.append({k: _bits(t) for k, t in sd.items()})
                expected[-1].update({f"{k}$meta": (t.dtype, t.shape) for k, t in sd.items()})
                allocations.append(w._buffers.allocations)
                train(live)  # training changes every tensor right after save() returned
                p.result()
        finally:
            w.close()
        assert allocations[1] == allocations[0]  # nothing changed: the bulk layout was reused
        assert allocations[2] == allocations[1]  # another tensor of the same shape: reused too
        ckpts = list_checkpoints(folder)
        assert [c.step for c in ckpts] == list(range(len(changes)))
        for c in ckpts:
            got = load_checkpoint(c.path)["state_dict"]
            exp = expected[c.step]
            assert sorted(got) == sorted(k for k in exp if not k.endswith("$meta"))
            bad = [k for k, t in got.items() if (t.dtype, t.shape) != exp[f"{k}$meta"] or not torch.equal(_bits(t), exp[k])]
            assert not bad, (fresh, c.step, bad)


def test_a_checked_state_changed_after_dense_views_is_read_again():
    """dense_views hands the bulk snapshot what it read (Checked); a dict changed after it is scanned again rather
    than trusted: the snapshot holds the tensors the dict holds when it is taken."""
    from lightning_ckpt.format.views import Checked, dense_views
    from lightning_ckpt.writer.snapshot import HostBuffers

    state = {f"t{i}": torch.randn(4) for i in range(100)}
    buffers = HostBuffers(pin_memory=False)
    for change in (lambda c: None, lambda c: c.__setitem__("t3", torch.randn(2, 2)),
                   lambda c: c.__setitem__("t4", torch.arange(4)), lambda c: c.pop("t5"),
                   lambda c: c.__setitem__("t6", torch.randn(4))):
        checked = dense_views(state)
        assert type(checked) is Checked
        change(checked)
        snap = buffers.snapshot(checked)
        assert list(snap) == list(checked)
        assert all(_same_bits(snap[k], t) for k, t in checked.items())
    assert type(dense_views({"n": torch.randn(2, dtype=torch.complex64).conj()})) is not Checked


@pytest.mark.parametrize("threads", [1, 2])
def test_the_bulk_copy_falls_back_to_copy_when_cat_refuses_a_tensor(tmp_path, monkeypatch, threads):
    """The steady-state check reads no device: a tensor that leaves the CPU makes torch.cat refuse (it never
    converts); the snapshot is then taken with copy_ (which copies across devices) and the next save lays out again.
    (No second device here: cat's refusal is injected once.) With two threads copying (a large state: here forced,
    with runs of 64 bytes), a refusal in either thread does the same."""
    from lightning_ckpt.format.views import dense_views
    from lightning_ckpt.writer import snapshot

    if threads == 2:
        monkeypatch.setattr(snapshot.SmallSlabs, "TWO_THREADS_FROM", 1)
        monkeypatch.setattr(snapshot, "CAT_BYTES", 64)
    state = {f"t{i}": torch.randn(4) for i in range(100)}
    buffers = snapshot.HostBuffers(pin_memory=False)
    buffers.snapshot(dense_views(state))
    allocated = buffers.allocations
    real_cat, calls = torch.cat, []

    def refusing_cat(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Expected all tensors to be on the same device")
        return real_cat(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", refusing_cat)
    for t in state.values():
        t.add_(1)
    snap = buffers.snapshot(dense_views(state))
    assert calls and all(_same_bits(snap[k], t) for k, t in state.items())
    assert buffers.allocations == allocated
    snap = buffers.snapshot(dense_views(state))  # laid out again
    assert buffers.allocations > allocated
    assert all(_same_bits(snap[k], t) for k, t in state.items())


def _guarded(monkeypatch, chunk: int = 16) -> list:
    """Guards on every state of a test (not only from 1,024 tensors), in chunks of ``chunk`` tensors, and the bulk
    copy split between two threads at any size; returns a list that records, per save, whether the guards stood in
    for the bulk check (True) or it ran (False)."""
    from lightning_ckpt.format.views import DenseMemo
    from lightning_ckpt.writer.snapshot import SmallSlabs

    monkeypatch.setattr(DenseMemo, "MIN_TENSORS", 1)
    monkeypatch.setattr(DenseMemo, "CHUNK", chunk)
    monkeypatch.setattr(SmallSlabs, "TWO_THREADS_FROM", 1)
    hits: list = []
    real = DenseMemo.recall

    def recall(self, tensors, vals):
        got = real(self, tensors, vals)
        hits.append(got is not None)
        return got

    monkeypatch.setattr(DenseMemo, "recall", recall)
    return hits


def test_the_guards_over_a_known_state_see_every_change_the_bulk_check_sees(tmp_path, monkeypatch):
    """Once a state was seen twice, one C++ guard per chunk (torch's TensorGuards) stands in for the bulk check's
    reads (format/views.DenseMemo). Each change of the list of the bulk snapshot test above is made to a plain state
    after three unchanged saves (so the guards are built and used), on the same tensor objects and on fresh detached
    ones: the guards refuse the changed state (the bulk check runs again) and accept an unchanged one, and every
    checkpoint holds, bit for bit, the values, dtypes and shapes at its save(), with deduplication's reads taken in
    the same pass. Fails when the guards compare no shapes or strides (checked: ``dynamic_dims_sizes``/``strides``
    of None)."""
    hits = _guarded(monkeypatch)
    base = {f"w{i}": torch.randn(5) for i in range(150)}
    base.update({f"z{i}": torch.randn(3, dtype=torch.complex64) for i in range(3)})
    for fresh in (False, True):
        live: dict = {}
        changes = [  # (a change to what the save must store, whether the guards see it)
            (lambda: live.__setitem__("w1", torch.randn(5)), False),  # another tensor alike: nothing to see
            (lambda: setattr(live["p"], "data", live["p"].data.view(2, 3)), True),  # same pointer and version
            (lambda: live["w2"].resize_(7), True),
            (lambda: live.__setitem__("w3", torch.randn(10)[::2]), True),  # same shape, strided
            (lambda: setattr(live["w4"], "data", live["w4"].data.view(torch.int32)), True),  # another dtype
            (lambda: live.__setitem__("w5", torch.randn(5, dtype=torch.complex64).conj().imag), True),  # negative
            (lambda: live.__setitem__("z1", live["z1"].conj()), True),  # conjugate view
            (lambda: live.__setitem__("w6", torch.randn(1, 5)), True),  # same size, one more dimension
            (lambda: live["w7"].resize_(40000), True),  # out of the bulk copy
        ]
        for i, (change, seen) in enumerate(changes):
            folder = tmp_path / f"{fresh}-{i}"
            live.clear()
            live.update({k: t.clone() for k, t in base.items()}, p=torch.nn.Parameter(torch.randn(6)))
            w = CheckpointWriter(folder, async_save=True)
            expected = []
            try:
                for phase in ("again", "again", "again", "changed"):
                    if phase == "changed":
                        change()
                    sd = {k: t.detach() for k, t in live.items()} if fresh else live
                    before = len(hits)
                    p = w.save({"state_dict": sd}, step=len(expected))
                    guarded = hits[-1] if len(hits) > before else None  # None: no guards to try
                    expected.append({k: (t.dtype, t.shape, _bits(t)) for k, t in sd.items()})
                    train(live)  # training changes every tensor right after save() returned
                    p.result()
                    if phase == "changed":
                        assert guarded is (not seen), (fresh, i, "the guards missed a change" if seen else guarded)
                    elif len(expected) == 3:
                        assert guarded is True, (fresh, i, "an unchanged state was checked again")
            finally:
                w.close()
            for c in list_checkpoints(folder):
                got = load_checkpoint(c.path)["state_dict"]
                exp = expected[c.step]
                assert sorted(got) == sorted(exp)
                bad = [k for k, t in got.items()
                       if (t.dtype, t.shape) != exp[k][:2] or not torch.equal(_bits(t), exp[k][2])]
                assert not bad, (fresh, i, c.step, bad)


def test_a_nested_tensor_in_a_guarded_state_is_refused_not_checked(tmp_path, monkeypatch):
    """A nested tensor must never reach the guards (inside their C++ check its strides abort the process): a state
    whose guards are built, with a nested tensor put in place of one of its tensors, is refused with the ValueError of
    the bulk check; the process lives on, and a later save of the plain state works."""
    hits = _guarded(monkeypatch)
    state = {f"t{i}": torch.randn(4) for i in range(40)}
    w = CheckpointWriter(tmp_path, async_save=True)
    try:
        for step in range(3):
            w.save({"state_dict": state}, step=step).result()
        assert hits[-1] is True
        plain = state["t5"]
        state["t5"] = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
        try:
            w.save({"state_dict": state}, step=3)
            raise AssertionError("a nested tensor was saved")
        except ValueError as e:
            assert "nested tensor" in str(e)
        state["t5"] = plain
        w.save({"state_dict": state}, step=4).result()
    finally:
        w.close()
    assert torch.equal(load_checkpoint(list_checkpoints(tmp_path)[-1].path)["state_dict"]["t5"], plain)


def test_guards_that_keep_failing_on_a_state_the_save_finds_unchanged_are_built_less_and_less_often(tmp_path,
                                                                                                    monkeypatch):
    """A change the guards see and the save does not care about (``requires_grad`` turned on and off at every save)
    makes them fail while the bulk check finds the same state: they are built again only after a wait that doubles
    with each such miss (building them costs about two bulk checks), and every save is kept."""
    from lightning_ckpt import compat

    hits = _guarded(monkeypatch)
    builds = []
    real = compat.tensor_guard
    monkeypatch.setattr(compat, "tensor_guard", lambda ts, shapes: builds.append(1) or real(ts, shapes))
    state = {f"t{i}": torch.randn(4) for i in range(40)}
    w = CheckpointWriter(tmp_path, async_save=True)
    try:
        for step in range(24):
            state["t3"].requires_grad_(step % 2 == 1)
            w.save({"state_dict": state}, step=step).result()
    finally:
        w.close()
    assert hits and not any(hits)
    # built after saves 1, 3, 6, 11 and 20 (waits of 1, 2, 4 and 8 saves), 3 guards each (40 tensors, chunks of 16)
    assert len(builds) == 5 * 3, len(builds)
    assert len(list_checkpoints(tmp_path)) == 24


def test_saves_without_the_guards_keep_the_bulk_check(tmp_path, monkeypatch):
    """Where torch lacks TensorGuards or it fails the self-test of the changes it must catch (compat.tensor_guard),
    nothing is built and every save runs the bulk check."""
    from lightning_ckpt import compat

    hits = _guarded(monkeypatch)
    monkeypatch.setattr(compat, "_GUARDS", [None])
    state = {f"t{i}": torch.randn(4) for i in range(40)}
    w = CheckpointWriter(tmp_path, async_save=True)
    try:
        for step in range(4):
            w.save({"state_dict": state}, step=step).result()
    finally:
        w.close()
    assert w._dense.checks is None and hits == []
    assert compat._tensor_guards_class() is not None  # (the torch CI runs on has a TensorGuards that passes)


def test_the_self_test_refuses_a_tensor_guard_that_misses_a_change(monkeypatch):
    """compat.tensor_guard uses torch's private TensorGuards only after checking, once per process, that it catches each
    change the snapshot relies on it to see: a class whose check passes everything (or raises) is refused."""
    import torch._C._dynamo.guards as guards

    from lightning_ckpt import compat

    class Blind:
        def __init__(self, *tensors, **kwargs):
            pass

        def check(self, *tensors):
            return True

    class Raising(Blind):
        def check(self, *tensors):
            raise TypeError("another signature")

    for fake in (Blind, Raising):
        monkeypatch.setattr(guards, "TensorGuards", fake)
        assert compat._tensor_guards_class() is None
        monkeypatch.setattr(compat, "_GUARDS", [])
        assert compat.tensor_guard([torch.zeros(2)], [torch.Size([2])]) is None


def test_a_guard_is_neither_built_nor_trusted_where_the_dispatch_keys_that_mark_a_view_are_excluded():
    """The guards compare dispatch keys as this thread's include/exclude sets make them look: with the negative key
    excluded (as inside a dispatcher kernel) a negative view would look plain. No guard is built there, and one built
    elsewhere fails there (and under inference mode, whose sets differ), so the bulk check runs."""
    from lightning_ckpt import compat

    ts = [torch.randn(3) for _ in range(4)]
    check = compat.tensor_guard(ts, [t.shape for t in ts])
    assert check(*ts)
    neg = list(ts)
    neg[2] = torch.randn(3)._neg_view()
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Negative)
    with torch._C._ExcludeDispatchKeyGuard(keys):
        assert compat.tensor_guard(ts, [t.shape for t in ts]) is None
        assert not check(*ts) and not check(*neg)
    with torch.inference_mode():
        assert not check(*ts)
    assert check(*ts) and not check(*neg)


def test_two_copying_threads_take_parameters_that_need_grad_without_laying_out_again(tmp_path, monkeypatch):
    """The helper thread that copies half of a large state runs without autograd too (``no_grad`` is per thread, and
    ``cat(out=)`` refuses a tensor that requires grad): a state of live ``Parameter`` objects is copied in bulk by
    both threads at every save, the layout kept, the values those at each save()."""
    from lightning_ckpt.writer import snapshot

    monkeypatch.setattr(snapshot.SmallSlabs, "TWO_THREADS_FROM", 1)
    monkeypatch.setattr(snapshot, "CAT_BYTES", 64)
    params = {f"p{i}": torch.nn.Parameter(torch.randn(4)) for i in range(100)}
    w = CheckpointWriter(tmp_path, async_save=True, dedup=False)
    expected, allocations = [], []
    try:
        for step in range(3):
            p = w.save({"state_dict": params}, step=step)
            expected.append({k: t.detach().clone() for k, t in params.items()})
            allocations.append(w._buffers.allocations)
            with torch.no_grad():
                for t in params.values():
                    t.mul_(-2)
            p.result()
    finally:
        w.close()
    assert allocations[0] == allocations[1] == allocations[2]  # laid out once: no refusal, no fallback
    check(tmp_path, expected)


def test_a_forked_child_copies_with_a_thread_of_its_own(monkeypatch):
    """The copying helper thread does not survive a fork: a child process whose host buffers were used with two
    threads in the parent starts a thread of its own (with the parent's pool it would wait forever for a thread
    that is not there)."""
    import os
    import time

    from lightning_ckpt.format.views import dense_views
    from lightning_ckpt.writer import snapshot

    monkeypatch.setattr(snapshot.SmallSlabs, "TWO_THREADS_FROM", 1)
    monkeypatch.setattr(snapshot, "CAT_BYTES", 64)
    state = {f"t{i}": torch.randn(4) for i in range(100)}
    buffers = snapshot.HostBuffers(pin_memory=False)
    buffers.snapshot(dense_views(state))  # the parent's helper thread
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when its copy is right
        code = 2
        try:
            for t in state.values():
                t.add_(1)
            snap = buffers.snapshot(dense_views(state))
            code = 0 if all(_same_bits(snap[k], t) for k, t in state.items()) else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child's copy never finished")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    buffers.clear()
