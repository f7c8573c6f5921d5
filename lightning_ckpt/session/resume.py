"""The newest valid checkpoint of a run among a folder and its backup locations: ``resume_path`` (a newer backup is
pulled into the folder), and the search ``resume="auto"`` makes (``newest_for_auto``: a staged folder against its
upload location; node-local folders through ``common_local_names``, collective). Where a fit starts, and which of
these searches applies, is decided in :mod:`lightning_ckpt.session.start`. No Lightning."""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Iterable, Optional

from ..errors import CheckpointError, StorageUnavailableError
from ..folder.transfer import pull_checkpoint
from ..read import ANY_RUN, latest_checkpoint, list_checkpoints, of_run, read_checkpoint_manifest, verify_checkpoint
from ..store import open_store

log = logging.getLogger("lightning_ckpt")


def _uris(backup_uri: Any) -> list[str]:
    specs = backup_uri if isinstance(backup_uri, (list, tuple)) else ([] if backup_uri is None else [backup_uri])
    return [open_store(s["uri"] if isinstance(s, dict) else s).uri for s in specs]


def resume_path(dirpath: Any, backup_uri: Any = None, *, run_name: Any = ANY_RUN) -> Optional[str]:
    """Where to resume from: the newest valid checkpoint among ``dirpath`` and the backups (``"s3://bucket/prefix"``,
    a list of them, or of ``{"uri": ...}`` location dicts); a backup is pulled into ``dirpath`` and verified only when
    it is newer than every valid local one (local wins a tie: nothing to download); ``None`` when there is none (start
    fresh). A corrupt checkpoint is skipped with a warning. When a backup cannot be read or pulled (S3 down, a missing
    object) and a valid local checkpoint exists, that one is returned with a warning that names the failure; with no
    local checkpoint the error is raised (starting fresh could silently drop the run).

    ``dirpath`` may itself be an ``s3://`` URI: then the newest valid checkpoint there is returned (verified through
    the local cache). Use it as ``trainer.fit(model, data, ckpt_path=resume_path("ckpts/", "s3://b/run"))``, so
    relaunching the same command, on the same machine or a fresh one, continues the run (or set ``resume="auto"`` on a
    saving callback). ``run_name``: only that run's checkpoints, in a folder several runs share.
    """
    return find_newest(dirpath, backup_uri, run_name=run_name)[0]


def find_newest(dirpath: Any, backup_uri: Any = None, *, run_name: Any = ANY_RUN
                ) -> tuple[Optional[str], Optional[str]]:
    """:func:`resume_path`'s search: ``(path, pulled_from)``, ``pulled_from`` the backup checkpoint that ``path`` is
    a fresh local copy of (None: ``path`` was in the folder already)."""
    store = open_store(dirpath)
    local = latest_checkpoint(store.uri, run_name=run_name) if store.exists() else None
    if store.read_cache:  # a location read where it is (through the read cache): no folder to pull a backup into
        return local, None
    local_step = _step(local)
    uris = _uris(backup_uri)
    tried: set[tuple[str, str]] = set()
    for quick in (True, False):  # each location's newest through its latest.json first; then every manifest
        candidates: list[tuple[int, int, str, str]] = []
        answered = True  # every location's newest came from its index
        for order, uri in enumerate(uris):
            try:
                steps = _newest_of(uri, run_name) if quick else None
                if steps is None:
                    answered = False
                    if quick:
                        continue
                    steps = [(c.step, c.name) for c in of_run(list_checkpoints(uri), run_name)]
            except Exception as e:  # noqa: BLE001 - S3 down, bucket missing, credentials
                answered = False
                if local is None and not quick:
                    raise
                if not quick:
                    warnings.warn(f"lightning_ckpt: cannot read backup location {uri} ({e!r}); resuming from the "
                                  f"local {local}", stacklevel=3)
                continue
            candidates += [(step, -order, uri, name) for step, name in steps
                           if step > local_step and (uri, name) not in tried]
        if quick and not answered:
            continue  # some location cannot say what its newest is: compare every location's full listing
        for step, _, uri, name in sorted(candidates, reverse=True):  # newest first; the first location on a tie
            tried.add((uri, name))
            try:
                return pull_checkpoint(f"{uri}/{name}", store.uri), f"{uri}/{name}"
            except Exception as e:  # noqa: BLE001 - a missing object, the server dying mid-download, a corrupt copy
                down = isinstance(e, StorageUnavailableError)  # an older one is on the same dead endpoint
                if local is None and (down or not isinstance(e, CheckpointError)):
                    raise
                if down:
                    warnings.warn(f"lightning_ckpt: could not pull the backup {uri}/{name} ({e}); resuming from the "
                                  f"local {local}", stacklevel=3)
                    return local, None
                warnings.warn(f"lightning_ckpt: could not pull the backup {uri}/{name} ({e!r}); "
                              + (f"resuming from the local {local}" if local else "trying an older one"), stacklevel=3)
        if quick and not candidates:
            break  # no location holds anything newer than the local checkpoint
    return local, None


def _newest_of(uri: str, run_name: Any) -> Optional[list[tuple[int, str]]]:
    """[(step, name)] of the newest checkpoint of ``run_name`` at a location through its ``latest.json`` index
    (``[]``: none), without a read per checkpoint; None when the index cannot tell (then every manifest is read)."""
    got = open_store(uri).newest_hinted(None if run_name is ANY_RUN else run_name, run_name is ANY_RUN)
    return None if got is None else [(int(m["step"]), name) for name, m in got]


def _step(path: Optional[str]) -> int:
    return int(read_checkpoint_manifest(path)["step"]) if path else -1


# ---------------------------------------------------------------------- resume="auto" (rank 0 decides)
def common_local_names(dirpath: str, run_name: Any, lead: bool, gather_all: Callable[[Any], list]
                       ) -> tuple[list[str], list[str]]:
    """Node-local folders (collective, every rank): the checkpoints committed in every written folder, oldest first,
    each verified by every folder's committing rank; and those that only some folders hold. A crash between two
    folders' commits leaves the newest checkpoint in some folders only; the run then resumes from the newest one
    that every folder holds whole. ``lead``: this rank commits into ``dirpath``; ``gather_all(obj)``: every rank's
    ``obj`` (``all_gather_object``)."""

    def gather(obj: Any) -> list:
        return [x for x in gather_all(obj) if x is not None]

    mine = ([c.name for c in of_run(list_checkpoints(dirpath), run_name)]
            if lead and os.path.isdir(dirpath) else None)
    lists = gather(mine)
    common = [n for n in lists[0] if all(n in other for other in lists[1:])] if lists else []
    bad: list = []
    if lead:  # each committing rank verifies the candidates in its own folder, newest first, up to the first good one
        for name in reversed(common):
            try:
                verify_checkpoint(os.path.join(dirpath, name))
                break
            except CheckpointError as e:
                log.warning("lightning_ckpt: resume='auto' skips %s in %s: %s", name, dirpath, e)
                bad.append(name)
    dropped = {n for b in gather(bad if lead else None) for n in b}
    some = sorted({n for names in lists for n in names} - set(common))
    return [n for n in common if n not in dropped], some


def _cannot_read(uri: str, e: Exception, what: str) -> CheckpointError:
    msg = (f"resume='auto' {what}cannot read {uri} ({e!r}); fix the S3 settings or the server, or drop resume='auto' "
           "to start fresh")
    return (StorageUnavailableError if isinstance(e, StorageUnavailableError) else CheckpointError)(msg)


def newest_for_auto(dirpath: str, backups: Iterable[str], run_name: Any, *, staged_for: Optional[str] = None,
                    among: Optional[list[str]] = None, only_some: Iterable[str] = ()
                    ) -> Optional[tuple[str, bool, Optional[str]]]:
    """Rank 0, ``resume="auto"``: ``(path, in this folder, pulled_from)`` of the newest valid checkpoint of the run
    among the folder and its backups (local wins a tie; a staged folder: the newer of the staged and the uploaded
    one), or None.
    Raises when a location cannot be read and nothing is local. ``among``: node-local folders, the local checkpoints
    every folder holds (:func:`common_local_names`); a newer backup is then read from S3 by every rank rather than
    pulled into one node's folder. ``staged_for``: the ``s3://`` location the folder at ``dirpath`` is staged for."""
    run, backups = run_name, list(backups)

    def newest_at(where: Any) -> Optional[str]:
        return latest_checkpoint(where, run_name=run)

    if among is not None:
        if staged_for is not None:  # only rank 0's staging folder is written: every node reads the uploads
            try:
                return _found(newest_at(staged_for))
            except Exception as e:  # noqa: BLE001
                raise _cannot_read(staged_for, e, "") from e
        local = os.path.join(dirpath, among[-1]) if among else None
        own, local_step = local is not None, _step(local)
        for uri in backups:
            try:
                remote = newest_at(uri)
            except Exception as e:  # noqa: BLE001 - S3 down: resume from the local one if there is one
                if local is None:
                    raise _cannot_read(uri, e, f"found no checkpoint in every node's {dirpath} and ") from e
                log.warning("lightning_ckpt: cannot read %s (%r); resuming from the local %s", uri, e, local)
                continue
            if _step(remote) > local_step:
                local, local_step, own = remote, _step(remote), False
        if local is None and list(only_some):  # say, a node replaced by a machine with an empty disk
            raise CheckpointError(
                f"resume='auto': the node-local folders {dirpath} hold no checkpoint in common, but some hold "
                f"{', '.join(list(only_some)[-3:])}. Starting fresh would drop the run: copy a checkpoint folder from "
                "a node that has it to the nodes that lack it (each node's copy is whole), or pass ckpt_path, or "
                "set backup_uri so that a new node resumes from S3.")
        return _found(local, own=own)
    if staged_for is not None:
        staged = newest_at(dirpath) if os.path.isdir(dirpath) else None
        try:
            remote = newest_at(staged_for)
        except Exception as e:  # noqa: BLE001
            if staged is not None:
                log.warning("lightning_ckpt: cannot read %s (%r); resuming from the staged %s", staged_for, e,
                            staged)
                return staged, False, None
            raise _cannot_read(staged_for, e, "") from e
        if staged is None or remote is None:
            return _found(staged or remote)
        return (staged if _step(staged) >= _step(remote) else remote), False, None
    try:
        return _found(*find_newest(dirpath, backups, run_name=run))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. the S3 server is down and nothing is local
        raise CheckpointError(f"resume='auto' found no local checkpoint in {dirpath} and cannot read the "
                              f"backup locations {backups} ({e!r}); fix the S3 settings or the server, or "
                              "drop resume='auto' to start fresh") from e


def _found(path: Optional[str], pulled_from: Optional[str] = None, own: bool = False
           ) -> Optional[tuple[str, bool, Optional[str]]]:
    return (path, own, pulled_from) if path else None
