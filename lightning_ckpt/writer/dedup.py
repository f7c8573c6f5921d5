"""Deduplicated saves: which tensors of a save are already in the folder's content store, and which go into it.

A save's tensors fall into three sets (decided by the folder's leader, who commits):

* **reused**: bytes already in a pack of ``.blobs`` that a committed checkpoint references. The manifest points at
  them; nothing is snapshotted or written. A tensor is reused when it is the same tensor as at the previous save of
  this writer and unchanged since (same storage, offset, shape, strides, dtype, device and autograd version
  counter; three 4 KiB windows of it, one at a random place, compared with the stored bytes as a spot check), or, at
  its first save in this process, when its XXH3-128 together with its dtype and shape matches a tensor in a pack of
  the folder (a resumed run, or a run branched from a checkpoint of this folder).
* **packed**: written this save into the save's pack (``pack-<save id>-rank<r>.safetensors``), which enters
  ``.blobs`` at the commit: tensors that are expected to stay as they are (frozen parameters and buffers, named by
  the caller as ``stable``) seen for the first time, and tensors found unchanged since the previous save.
* everything else is written into the checkpoint's own files as before, hashed while it is written.

Only plain tensors of the model and optimizer state take part (never sharded tensors, never one rank's own state).

**Every reuse is proven by content.** A tensor becomes a reference only to bytes whose content this process knows:
a pack it wrote itself (its hashes computed from the bytes as they were written), or a pack it read back whole and
checked against the record it is about to copy into the new manifest (header, every CRC32C, every XXH3-128:
``_proved``). A hash read from a manifest is only a lead: the index built from the folder's manifests says where to
look, never what is there. A pack that fails its proof is not referenced by this process (its tensors are written
again) and a warning names it.

One cohesive object, kept whole past 400 lines: :class:`Deduper` holds one state (what this process knows of the
folder's packs and of its own previous save) that its training-thread half (``plan``/``observe``) and its background
half (``finish``, the proof, the index) read and update under one set of rules; split, each half would reach into the
other's attributes.
"""
from __future__ import annotations

import logging
import os
import random
import stat
from itertools import compress
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..compat import tensor_version
from ..format.checksum import content_hash
from ..format.tensorfile import byte_view, check_file, dtype_name
from ..store.blobs import BlobStore, PackFiles
from ..store.fs import open_member
from ..store.local import LocalStore
from ..errors import CheckpointError
from ..format.views import DATA_PTR_OF, VERSION_OF, as_dtensor, is_sharded_tensor

log = logging.getLogger("lightning_ckpt")

WINDOW = 4096  # bytes of each spot-check window


def signature(t: torch.Tensor) -> tuple | None:
    """What identifies an unchanged tensor between two saves, or None when it cannot be tracked (an inference tensor
    has no version counter; a tensor subclass may hide its storage)."""
    if type(t) not in _PLAIN or t.layout != torch.strided:
        return None
    version = tensor_version(t)
    if version is None:
        return None
    try:
        ptr = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    # (torch.device, torch.Size and the stride tuple compare by value: no conversion per tensor.) The data pointer
    # (storage start + offset) names the storage as well as its start would: the tensor remembered with the signature
    # keeps its storage alive, so no other storage can start where it does.
    return (t.device, t.dtype, t.shape, t.stride(), t.storage_offset(), ptr, version)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _data_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def eligible(key: str, t: Any, is_shared: Any) -> bool:
    return (isinstance(t, torch.Tensor) and is_shared(key) and as_dtensor(t) is None and not is_sharded_tensor(t)
            and t.layout == torch.strided)


@dataclass
class Ref:
    """Where a tensor's bytes are in the content store."""

    pack: str
    name: str  # the tensor's name inside the pack
    entry: dict  # the pack's record (as manifests carry it)
    xxh128: str | None = None

    def chunk(self, shape: list[int]) -> dict:
        return {"pack": self.pack, "name": self.name, "offsets": [0] * len(shape), "sizes": list(shape)}


@dataclass
class _Known:
    tensor: torch.Tensor  # a reference to the live tensor: its storage cannot be reused by another while held
    sig: tuple
    ref: Ref | None  # None: it was written into the checkpoint's own files


@dataclass
class Plan:
    """The training thread's part of one save's decision (cheap: signatures, spot checks)."""

    reuse: dict[str, Ref] = field(default_factory=dict)  # unchanged since the previous save, already in a pack
    candidates: set[str] = field(default_factory=set)  # for the pack, unless found in the store by hash
    seen: dict[str, tuple[torch.Tensor, tuple]] = field(default_factory=dict)  # key -> (tensor, signature)
    # tensors snapshotted in bulk whose planning ``finish`` completes in the background: (keys, tensors, version
    # counters, data pointers), the last two read on the training thread at save(); and the save's stable keys
    later: tuple | None = None
    stable: frozenset = frozenset()


@dataclass
class Decision:
    """What every rank does in one save: drop ``reuse`` (the leader adds their references), write ``to_pack`` into
    the save's pack."""

    reuse: dict[str, Ref] = field(default_factory=dict)
    to_pack: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)  # packs found by hash, pinned until the save ends (``release``)

    def for_others(self) -> tuple[list[str], list[str]]:
        return sorted(self.reuse), sorted(self.to_pack)


class Deduper:
    """One writer's memory of what is in its folder's content store."""

    def __init__(self, dirpath: str, *, fsync: bool, is_shared: Any) -> None:
        self.blobs = BlobStore(dirpath, fsync=fsync)
        self.is_shared = is_shared
        self.known: dict[str, _Known] = {}
        self.index: dict[tuple, Ref] | None = None  # (xxh128, dtype, shape) -> Ref, built from the folder's manifests
        self._pinned: list[str] = []
        self._rng = random.Random(0x1C)
        # pack -> the record this process knows to be true of its bytes (it wrote them, or read them back and checked
        # every checksum and content hash); packs whose bytes failed that check are not referenced by this process
        self._proven: dict[str, dict] = {}
        self._refused: set[str] = set()
        self._shared: tuple[list[str] | None, list[bool]] = (None, [])  # observe(): is_shared of the last key list

    # ---------------------------------------------------------------- the training thread
    def plan(self, tensors: dict[str, Any], stable: Iterable[str], *, leader: bool = True) -> Plan:
        """``leader``: the rank that commits decides; the others only note what they saw."""
        stable = set(stable)
        p = Plan()
        is_shared, known, seen, strided = self.is_shared, self.known, p.seen, torch.strided
        with PackFiles(self.blobs.path) as packs:
            for k, t in tensors.items():
                if type(t) in _PLAIN:  # (the common case: signature() inlined, without eligible's type checks)
                    if not is_shared(k) or t.layout != strided:
                        continue
                    version = tensor_version(t)
                    if version is None:
                        continue
                    try:
                        ptr = t.data_ptr()
                    except (RuntimeError, NotImplementedError):
                        continue
                    sig = (t.device, t.dtype, t.shape, t.stride(), t.storage_offset(), ptr, version)
                else:
                    if not eligible(k, t, is_shared):
                        continue
                    sig = signature(t)
                    if sig is None:
                        continue
                seen[k] = (t, sig)
                if not leader:
                    continue
                kn = known.get(k)
                if kn is not None and kn.sig == sig:
                    if kn.ref is not None and self._spot_check(t, kn.ref, packs):
                        p.reuse[k] = kn.ref
                    else:
                        p.candidates.add(k)  # unchanged since the previous save: into the pack this time
                elif kn is None and k in stable:
                    p.candidates.add(k)
        return p

    def observe(self, plan: Plan, keys: list[str], tensors: list[torch.Tensor], stable: Iterable[str],
                signals: tuple[list, list] | None = None) -> None:
        """The training thread's part for tensors snapshotted in bulk (small plain CPU tensors, already known to be
        dense and in memory): only what training may change right after save() returns is read now, their version
        counters and data pointers, with one ``map`` each; :meth:`finish` does the rest in the background. Which
        keys take part (``is_shared``) is remembered for the same key list. ``signals``: those two lists for
        ``tensors``, already read in this save() (``format.views.DenseMemo``, with its check)."""
        if self._shared[0] != keys:
            self._shared = (keys, [self.is_shared(k) for k in keys])
        mask = self._shared[1]
        if not all(mask):
            keys, tensors = list(compress(keys, mask)), list(compress(tensors, mask))
            if signals is not None:
                signals = (list(compress(signals[0], mask)), list(compress(signals[1], mask)))
        if signals is not None:
            versions, ptrs = signals
            plan.later, plan.stable = (keys, tensors, versions, ptrs), frozenset(stable)
            return
        try:
            versions = list(map(VERSION_OF, tensors))
        except RuntimeError:  # an inference tensor has no version counter: it is not tracked
            versions = [tensor_version(t) for t in tensors]
        try:
            ptrs = list(map(DATA_PTR_OF, tensors))
        except (RuntimeError, NotImplementedError):
            ptrs = [_data_ptr(t) for t in tensors]
        plan.later, plan.stable = (keys, tensors, versions, ptrs), frozenset(stable)

    def finish(self, plan: Plan, snapshot: dict[str, torch.Tensor], *, leader: bool = True) -> set[str]:
        """The background thread's part of :meth:`observe`: the signatures (dtype and shape from the snapshot, taken
        at save(); strides and offset now: they change only with the data pointer or the version counter, or through
        ``.data =``, which the spot check catches as it catches writes through ``.data``) and the same decisions as
        :meth:`plan`, spot checks made on the snapshot (the bytes as they were at save()). Returns the keys a rank
        that does not commit leaves out (unchanged since they went into the store)."""
        later, plan.later = plan.later, None
        skip: set[str] = set()
        if later is None:
            return skip
        with PackFiles(self.blobs.path) as packs:
            self._finish(plan, snapshot, later, leader, packs, skip)
        return skip

    def _finish(self, plan: Plan, snapshot: dict, later: tuple, leader: bool, packs: PackFiles, skip: set) -> None:
        known, seen, stable, cpu = self.known, plan.seen, plan.stable, torch.device("cpu")
        for k, t, version, ptr in zip(*later):
            view = snapshot.get(k)
            if version is None or ptr is None or view is None:
                continue
            sig = (cpu, view.dtype, view.shape, t.stride(), t.storage_offset(), ptr, version)
            seen[k] = (t, sig)
            kn = known.get(k)
            if not leader:
                if kn is not None and kn.sig == sig:
                    skip.add(k)
            elif kn is not None and kn.sig == sig:
                if kn.ref is not None and self._spot_check(view, kn.ref, packs):
                    plan.reuse[k] = kn.ref
                else:
                    plan.candidates.add(k)
            elif kn is None and k in stable:
                plan.candidates.add(k)

    def _spot_check(self, t: torch.Tensor, ref: Ref, packs: PackFiles) -> bool:
        """Three windows of the live tensor equal the stored bytes (catches a change made through ``.data``, which
        the version counter does not see). ``packs``: the pack files opened by this plan so far (each pack is opened
        once per plan, not once per tensor: an unchanged state of 50,000 tensors spent 2 s opening files)."""
        rec = (ref.entry.get("tensors") or {}).get(ref.name)
        if rec is None or not t.is_contiguous():
            return False
        n = t.numel() * t.element_size()
        if rec["end"] - rec["begin"] != n:
            return False
        if n == 0:
            return True
        w = min(WINDOW, n)
        starts = {0, n - w, self._rng.randrange(0, n - w + 1)}
        flat = t.detach().reshape(-1).view(torch.uint8)
        fd = packs.open(ref.pack, int(ref.entry["size"]))
        if fd is None:
            return False
        for a in sorted(starts):
            stored = os.pread(fd, w, int(rec["begin"]) + a)
            live = flat[a:a + w]
            if live.device.type != "cpu":
                live = live.cpu()
            if stored != bytes(byte_view(live)):
                return False
        return True

    # ---------------------------------------------------------------- the background thread, on the leader
    def decide(self, plan: Plan, tensors: dict[str, Any]) -> Decision:
        """Resolve the candidates: reuse those whose bytes a pack of the folder already holds, pack the rest. A pack
        found by hash is held (pinned) until the save ends (``release``), so that no collection removes it before
        the commit."""
        d = Decision(reuse=dict(plan.reuse))
        for k in sorted(plan.candidates):
            t = tensors.get(k)
            if t is None:
                continue
            ref = self._lookup(t)
            if ref is not None and ref.pack not in d.held and not self._hold(ref, d):
                # collected (or damaged) since the index was built: look again in what the folder holds now
                self.index = None
                ref = self._lookup(t)
                if ref is not None and ref.pack not in d.held and not self._hold(ref, d):
                    ref = None
            if ref is not None and not self._proved(ref):
                ref = None  # the index's word is not proof: its bytes are written again
            if ref is not None:
                d.reuse[k] = ref
            else:
                d.to_pack.add(k)
        return d

    def _proved(self, ref: Ref) -> bool:
        """The pack's bytes are what ``ref.entry`` (the record the new manifest will carry) says: known to this
        process, or read back now and checked whole (its header, every CRC32C, every XXH3-128), once per pack and
        record. A pack that fails is refused for the rest of the process, with a warning."""
        known = self._proven.get(ref.pack)
        if known is not None and (known is ref.entry or known == ref.entry):  # (the index shares one record per pack)
            return True
        if ref.pack in self._refused:
            return False
        where = self.blobs.pack(ref.pack)
        try:
            fd = open_member(self.blobs.path, ref.pack, int(ref.entry["size"]), where=where)
            with os.fdopen(fd, "rb", buffering=0) as f:
                check_file(f, ref.entry, where)
        except (OSError, CheckpointError, KeyError, TypeError, ValueError) as e:
            self._refused.add(ref.pack)
            log.warning("lightning_ckpt: not reusing the bytes of %s: they do not prove what the folder's manifests "
                        "record of them (%s). This save writes those tensors again; run `lightning-ckpt verify` on the "
                        "checkpoints that reference the pack.", where, e)
            return False
        self._proven[ref.pack] = ref.entry
        return True

    def _hold(self, ref: Ref, d: Decision) -> bool:
        """Pin ``ref``'s pack for the save deciding ``d`` if it is still in the store with its size (under the blob
        lock: a collection either ran before, and the pack is gone, or runs after and sees the pin)."""
        with self.blobs.lock:
            try:
                st = os.lstat(self.blobs.pack(ref.pack))
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode) or st.st_size != int(ref.entry.get("size", -1)):
                return False
            self.blobs.pin([ref.pack])
        d.held.append(ref.pack)
        return True

    def release(self, d: Decision | None) -> None:
        """The save that decided ``d`` is over (committed, failed or dropped): its held packs are no longer pinned
        by it (a committed one is referenced by its manifest now, and pinned by ``committed`` while reused)."""
        if d is not None and d.held:
            self.blobs.unpin(d.held)
            d.held = []

    def _lookup(self, t: torch.Tensor) -> Ref | None:
        if self.index is None:
            self.index = self._build_index()
        if not self.index:
            return None
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (content_hash(byte_view(t.contiguous())), dtype_name(t.dtype), tuple(int(s) for s in t.shape))
        ref = self.index.get(key)
        return None if ref is None or ref.pack in self._refused else ref

    def _build_index(self) -> dict[tuple, Ref]:
        index: dict[tuple, Ref] = {}
        store = LocalStore(self.blobs.root)
        present = set(self.blobs.names())
        self._proven = {p: e for p, e in self._proven.items() if p in present}  # (forget the collected ones)
        for name in store.names():
            try:
                m, _ = store.read_manifest(name)
            except CheckpointError:
                continue
            self._index_packs(index, m.get("packs") or {}, present)
        return index

    @staticmethod
    def _index_packs(index: dict, packs: dict, present: set[str] | None = None) -> None:
        for pname, entry in packs.items():
            if present is not None and pname not in present:
                continue
            for tname, rec in (entry.get("tensors") or {}).items():
                h = rec.get("xxh128")
                if h:
                    index.setdefault((h, rec["dtype"], tuple(rec["shape"])), Ref(pname, tname, entry, h))

    # ---------------------------------------------------------------- after the commit
    def committed(self, plan: Plan, m: dict) -> None:
        """The leader learns where each tensor of the committed manifest ``m`` lives, for the next save."""
        packs = m.get("packs") or {}
        known: dict[str, _Known] = {}
        for k, (t, sig) in plan.seen.items():
            entry = (m.get("tensors") or {}).get(k)
            if not entry or len(entry["chunks"]) != 1:
                continue
            c = entry["chunks"][0]
            ref = None
            if "pack" in c and c["pack"] in packs:
                rec = packs[c["pack"]]["tensors"][c["name"]]
                ref = Ref(c["pack"], c["name"], packs[c["pack"]], rec.get("xxh128"))
            known[k] = _Known(t, sig, ref)
        self.known, plan.seen = known, {}  # (the plan's pairs are freed here, not by the training thread)
        # every pack of a manifest this process committed is proven: written by it, or proven before it was reused
        self._proven.update(packs)
        if self.index is not None:
            self._index_packs(self.index, packs)
        pins = sorted({kn.ref.pack for kn in known.values() if kn.ref is not None})
        self.blobs.pin(pins)
        self.blobs.unpin(self._pinned)
        self._pinned = pins

    def follower_saw(self, plan: Plan, decision_keys: tuple[list[str], list[str]]) -> None:
        """A rank that does not commit remembers which of its tensors went into the store, so that it skips
        snapshotting them next time while they stay unchanged (the leader then reuses them)."""
        reused, packed = decision_keys
        stored = set(reused) | set(packed)
        fake = Ref("", "", {})
        self.known = {k: _Known(t, sig, fake) for k, (t, sig) in plan.seen.items() if k in stored}

    def follower_plan(self, tensors: dict[str, Any]) -> set[str]:
        """Keys a rank that does not commit may leave out of its snapshot."""
        out = set()
        for k, t in tensors.items():
            kn = self.known.get(k)
            if kn is not None and eligible(k, t, self.is_shared) and signature(t) == kn.sig:
                out.add(k)
        return out

    def forget(self) -> None:
        """A save failed: trust nothing remembered (the next save hashes, looks up and proves again)."""
        self.known = {}
        self.index = None
        self._proven = {}
        self._refused = set()

    def close(self) -> None:
        self.blobs.unpin(self._pinned)
        self._pinned = []
        self.known = {}
