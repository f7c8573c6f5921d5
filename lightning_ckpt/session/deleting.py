"""What a folder's session keeps and deletes: the protections of its participants and uploads, deletions (out of the
listing at once, the bytes in the background, then the content store's unreferenced packs), and the retention rules
applied after each commit. A mixin of :class:`~lightning_ckpt.session.session.FolderSession`; the planning and the
deleting are the folder's (:class:`~lightning_ckpt.folder.Folder`), held here across saves so that its state follows
the commits and deletions of the run instead of being computed again from the whole folder at each save.

Runs on the folder's leader (the committing thread, after each commit); ``delete`` also when a best-k callback evicts.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

from ..folder import Plan

log = logging.getLogger("lightning_ckpt")


class Deleting:
    """Deletion and retention for a :class:`FolderSession`. It uses the session's ``folder`` (its
    :class:`~lightning_ckpt.folder.Folder`, kept across saves), ``dirpath``, ``store``, ``options``, ``participants``,
    ``uploaders``, ``primary``, ``retention``, ``resumed_from``, ``best_rules()``, ``announce``, ``_deleter``,
    ``deleted`` and ``retention_deleted``."""

    def own_protections(self) -> dict[str, str]:
        """What this run keeps beyond what the folder needs: its resume point, its participants' protections
        (best-k), the checkpoints waiting for an upload."""
        out: dict[str, str] = {}
        if self.resumed_from:
            out[os.path.basename(os.path.normpath(self.resumed_from))] = "the checkpoint this run resumed from"
        for p in list(self.participants):
            try:
                for n in p.protect():
                    out.setdefault(n, f"kept by {type(p).__name__}")
            except Exception as e:  # noqa: BLE001
                log.error("lightning_ckpt: %s could not say what to keep: %r", type(p).__name__, e)
        for up in list(self.uploaders.values()):
            for n in up.pending():  # a checkpoint waiting for its upload is never deleted locally
                out.setdefault(n, f"waiting for its upload to {up.uri}")
        return out

    def protected(self, ckpts: list | None = None) -> set[str]:
        """What no deletion of this session may take: :meth:`own_protections` and what any run of the folder needs
        (``folder.needed``: the newest of each run, the current best recorded in the manifests, every resume and
        branch point; a ranking rule of a live participant is left to it: it knows the saves in flight). ``ckpts``:
        the folder's listing when the caller has one."""
        return set(self.own_protections()) | set(self.folder.needed(ckpts, live_rules=self.best_rules()))

    def plan(self, rule_sets: list, newest: Optional[str] = None, ckpts: list | None = None) -> Plan:
        """What ``rule_sets`` would delete in the folder now (``newest``: kept too, the commit being handled)."""
        own = self.own_protections()
        if newest is not None:
            own.setdefault(newest, "the checkpoint just committed")
        return self.folder.plan(rule_sets, ckpts=ckpts, protect=own, live_rules=self.best_rules())

    def delete(self, names: Iterable[str], reason: str, protected: Optional[set] = None) -> list[str]:
        """Delete committed checkpoints (never a protected one): out of the listing now, the bytes in the background,
        then the packs no checkpoint references any more. Returns the names deleted."""
        if protected is None:
            protected = self.protected()
        names = [n for n in names if n not in protected]

        primary = self.primary
        where = primary.folder.store if primary is not None else self.store  # the folder the user named

        def said(name: str) -> None:
            self.announce(f"lightning_ckpt: deleted {where.path(name)} ({reason})")

        if primary is not None:  # an s3:// dirpath: delete there, after the uploads queued before
            done = list(names)
            for name in done:
                primary.enqueue_delete(name)
                said(name)
        else:
            plan = Plan([], dict.fromkeys(names, reason), {})
            done = self.folder.apply(plan, purge=self._deleter, on_deleted=said)
        self.deleted += done
        return done

    def apply_retention(self, newest: str) -> list[str]:
        """Delete what no retention rule set keeps (a checkpoint stays when any set keeps it)."""
        try:
            plan = self.plan([r for _, r in self.retention], newest)
        except ValueError as e:
            log.warning("lightning_ckpt: retention deletes nothing in %s: %s", self.key, e)
            return []
        done = self.delete(plan.names, "retention policy", set(plan.protected)) if plan.doomed else []
        self.retention_deleted += done
        return done
