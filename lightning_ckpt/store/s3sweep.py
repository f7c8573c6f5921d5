"""The sweeps of an S3 location, for :class:`~.s3.S3Store` (each request they make is a method of the store, which
the fault-injection tests wrap): the collection of the content store's unreferenced packs, under a grace period and
reuse marks, and the debris the cleanup policy (``store/base.py``) removes. ``self`` is the ``S3Store``."""
from __future__ import annotations

import datetime as _dt
import logging
from typing import Any

from ..errors import CheckpointError
from ..format import manifest as mf
from .base import PARTIAL_PREFIX, owner_gone, owner_of, owner_token
from .s3listing import KEPT

log = logging.getLogger("lightning_ckpt")
REUSED = ".reused~"  # <prefix>/.blobs/<pack>.reused~<host>.<pid>: a push of that process reused the pack


def collect_packs(self: Any, *, grace_s: float = 3600.0, mine: "set[str] | frozenset" = frozenset(),
                  dry_run: bool = False) -> tuple[list[str], int]:
    """Delete the packs of the content store (``<prefix>/.blobs/``) that no committed manifest references: those
    this process uploaded (``mine``) at once unless a push of another process reused one since, any other only once
    neither it nor its reuse marks were touched for ``grace_s`` seconds (it may belong to an upload in progress elsewhere, whose
    manifest comes last). A manifest that cannot be read stops the sweep. Returns (deleted pack names, bytes
    freed).

    Against a push in another process that found a pack there and did not upload it (``tools/transfer.py``):
    that push writes the pack's reuse mark right before its manifest. This collection reads the manifests after
    its first listing and lists the marks again right before it deletes: a push that committed before the
    manifests were read marks the pack by its manifest, one that wrote its mark before the second listing is
    seen there; only a push that marks and commits between the second listing and the delete request is not,
    and that push checks the pack again after its commit and uploads it again if it is gone.
    """
    packs, marks = self.blob_listing()
    if not packs and not marks:
        return [], 0
    marked: set[str] = set()
    KEPT.expire(self, grace_s / 2)  # a kept listing (store/s3listing.py) must be younger than this
    for name, m in self.manifests():
        if isinstance(m, CheckpointError):
            log.warning("lightning_ckpt: not collecting unreferenced packs in %s: the manifest of %s cannot be read "
                        "(%s)", self.uri, name, m)
            return [], 0
        marked.update((m.get("packs") or {}).keys())
    now = _dt.datetime.now(_dt.timezone.utc)

    me = REUSED + owner_token()

    def due(n: str, packs: dict, marks: dict) -> bool:
        o, ts = packs[n], marks.get(n, [])
        if n in mine and not any(t["LastModified"] >= o["LastModified"] for t in ts if not t["Key"].endswith(me)):
            return True  # this process uploaded it, and no push of another process reused it since
        newest = max([o["LastModified"]] + [t["LastModified"] for t in ts])
        return (now - newest).total_seconds() >= grace_s

    doomed = [n for n in sorted(packs) if n not in marked and due(n, packs, marks)]
    orphans = [t["Key"] for n, ts in sorted(marks.items()) if n not in packs for t in ts
               if (now - t["LastModified"]).total_seconds() >= grace_s]
    if dry_run:
        return doomed, sum(int(packs[n]["Size"]) for n in doomed)
    if doomed:  # a push elsewhere may have marked one as reused since the first listing: look again, then delete
        packs, marks = self.blob_listing()
        doomed = [n for n in doomed if n in packs and due(n, packs, marks)]
    if doomed or orphans:
        self.delete_keys([packs[n]["Key"] for n in doomed] + [t["Key"] for n in doomed for t in marks.get(n, [])]
                         + orphans)
    return doomed, sum(int(packs[n]["Size"]) for n in doomed)


def debris(self: Any, older_than_s: float) -> dict[str, list[str]]:
    """{name: keys} of what the cleanup policy (``store/base.py``) removes: a name's objects without a
    ``manifest.json`` untouched for ``older_than_s`` (no owner is recorded there), and staging prefixes
    (``.partial-<name>~<owner>~<id>``) whose writer is gone or that nothing touched for ``older_than_s``.
    ``everyone`` does not apply: nobody holds an S3 location's lock."""
    now = _dt.datetime.now(_dt.timezone.utc)
    skip = len(self.prefix) + 1 if self.prefix else 0
    groups: dict[str, list[dict]] = {}
    for obj in self.list_objects():
        parts = obj["Key"][skip:].split("/")
        if len(parts) >= 2 and (mf.is_plain_name(parts[0]) and len(parts) == 2 or parts[0].startswith(PARTIAL_PREFIX)):
            groups.setdefault(parts[0], []).append(obj)
    out = {}
    mine = owner_token()
    for name, objs in sorted(groups.items()):
        if name.startswith(PARTIAL_PREFIX):
            owner = owner_of(name)
            if owner == mine:
                continue
            gone = owner_gone(owner)
        else:
            if any(o["Key"].endswith("/" + mf.MANIFEST) for o in objs):
                continue
            gone = False
        newest = max(o["LastModified"] for o in objs)
        if gone or (now - newest).total_seconds() >= older_than_s:
            out[name] = [o["Key"] for o in objs]
    return out
