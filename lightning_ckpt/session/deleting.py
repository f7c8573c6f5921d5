"""What a folder's session keeps and deletes: the protections of its participants and uploads, deletions (out of the
listing at once, the bytes in the background, then the content store's unreferenced packs), and the retention rules
applied after each commit. A mixin of :class:`~lightning_ckpt.session.session.FolderSession`."""
from __future__ import annotations

import logging
import os
from typing import Iterable

from ..read import _scan, list_checkpoints, of_run
from ..store.blobs import BlobStore
from ..folder.needed import needed
from ..folder.retention import plan_deletions, records_of

log = logging.getLogger("lightning_ckpt")


class Deleting:
    """Deletion and retention for a :class:`FolderSession` (which provides the attributes used here)."""

    def protected(self, ckpts: list | None = None) -> set[str]:
        """What no deletion of this session may take: this run's resume point, its participants' protections (best-k),
        the checkpoints waiting for an upload, and what any run of the folder needs (``folder.needed``: the newest of
        each run, the current best recorded in the manifests, every resume and branch point). ``ckpts``: the
        folder's listing when the caller has one."""
        names: set[str] = set()
        if self.resumed_from:
            names.add(os.path.basename(os.path.normpath(self.resumed_from)))
        for p in list(self.participants):
            try:
                names |= set(p.protect())
            except Exception as e:  # noqa: BLE001
                log.error("lightning_ckpt: %s could not say what to keep: %r", type(p).__name__, e)
        for up in list(self.uploaders.values()):
            names |= up.pending()  # a checkpoint waiting for its upload is never deleted locally
        # a ranking rule of a live participant is left to it: it knows the saves in flight (its protect() above)
        names |= set(needed(_scan(self.dirpath)[0] if ckpts is None else ckpts, live_rules=self.best_rules()))
        return names

    def delete(self, names: Iterable[str], reason: str) -> list[str]:
        """Delete committed checkpoints (never a protected one): out of the listing now, the bytes in the background.
        Returns the names deleted."""
        protected = self.protected()
        done = []
        for name in names:
            if name in protected:
                continue
            if self.primary is not None:  # an s3:// dirpath: delete there, after the uploads queued before
                self.primary.enqueue_delete(name)
            else:
                trash = self.store.trash(name)
                if trash is None:
                    continue
                self._deleter.submit(self.store.purge, trash)
            done.append(name)
            self.announce(f"lightning_ckpt: deleted {self.store.path(name) if not self.remote else self.remote + '/' + name}"
                          f" ({reason})")
        self.deleted += done
        if done and self.primary is None:
            self._deleter.submit(self._collect_packs)  # after the purges queued above
        return done

    def _collect_packs(self) -> None:
        """Remove the packs of the folder's content store no checkpoint references any more (the deleter thread)."""
        try:
            self.store.collect_packs()
        except Exception as e:  # noqa: BLE001 - retried after the next deletion
            log.error("lightning_ckpt: could not collect unreferenced packs in %s: %r", self.dirpath, e)

    def apply_retention(self, newest: str) -> list[str]:
        """Delete what no retention rule set keeps (a checkpoint stays when any set keeps it)."""
        ckpts = list_checkpoints(self.dirpath)
        try:
            doomed = plan_deletions(records_of(of_run(ckpts, self.options.run_name)),
                                    [r for _, r in self.retention],
                                    self.protected(ckpts) | {newest})
        except ValueError as e:
            log.warning("lightning_ckpt: retention deletes nothing in %s: %s", self.key, e)
            return []
        done = self.delete(doomed, "retention policy") if doomed else []
        self.retention_deleted += done
        return done
