"""Where to resume from: the newest valid checkpoint among a folder and its backups (``resume_path``), and the choice
``resume="auto"`` makes for a folder's session (``choose``, collective over node-local folders). No Lightning."""
from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch.distributed as dist

from ..errors import CheckpointError, StorageUnavailableError
from ..read import ANY_RUN, latest_checkpoint, list_checkpoints, of_run, read_checkpoint_manifest, verify_checkpoint
from ..read import latest_checkpoint as _latest
from ..store import is_remote, open_store
from ..folder.transfer import pull_checkpoint

if TYPE_CHECKING:
    from .session import FolderSession

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
    store = open_store(dirpath)
    if store.remote:
        return latest_checkpoint(store.uri, run_name=run_name)
    local = latest_checkpoint(store.uri, run_name=run_name) if store.exists() else None
    local_step = int(read_checkpoint_manifest(local)["step"]) if local is not None else -1
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
                                  f"local {local}", stacklevel=2)
                continue
            candidates += [(step, -order, uri, name) for step, name in steps
                           if step > local_step and (uri, name) not in tried]
        if quick and not answered:
            continue  # some location cannot say what its newest is: compare every location's full listing
        for step, _, uri, name in sorted(candidates, reverse=True):  # newest first; the first location on a tie
            tried.add((uri, name))
            try:
                return pull_checkpoint(f"{uri}/{name}", store.uri)
            except Exception as e:  # noqa: BLE001 - a missing object, the server dying mid-download, a corrupt copy
                down = isinstance(e, StorageUnavailableError)  # an older one is on the same dead endpoint
                if local is None and (down or not isinstance(e, CheckpointError)):
                    raise
                if down:
                    warnings.warn(f"lightning_ckpt: could not pull the backup {uri}/{name} ({e}); resuming from the "
                                  f"local {local}", stacklevel=2)
                    return local
                warnings.warn(f"lightning_ckpt: could not pull the backup {uri}/{name} ({e!r}); "
                              + (f"resuming from the local {local}" if local else "trying an older one"), stacklevel=2)
        if quick and not candidates:
            break  # no location holds anything newer than the local checkpoint
    return local


def _newest_of(uri: str, run_name: Any) -> Optional[list[tuple[int, str]]]:
    """[(step, name)] of the newest checkpoint of ``run_name`` at an S3 location through its ``latest.json`` index
    (``[]``: none), without a GET per checkpoint; None when the index cannot tell (then every manifest is read)."""
    got = open_store(uri).newest_hinted(None if run_name is ANY_RUN else run_name, run_name is ANY_RUN)
    return None if got is None else [(int(m["step"]), name) for name, m in got]


def common_local_names(session: "FolderSession") -> tuple[list[str], list[str]]:
    """Node-local folders (collective, every rank): the checkpoints committed in every written folder, oldest first,
    each verified by every folder's committing rank; and those that only some folders hold. A crash between two
    folders' commits leaves the newest checkpoint in some folders only; the run then resumes from the newest one
    that every folder holds whole."""
    w = session.writer
    lead = w.is_leader and w.folder_written

    def gather(obj: Any) -> list:
        out: list = [None] * w.world_size
        dist.all_gather_object(out, obj, group=w.pg)
        return [x for x in out if x is not None]

    mine = ([c.name for c in of_run(list_checkpoints(session.dirpath), session.run_name)]
            if lead and os.path.isdir(session.dirpath) else None)
    lists = gather(mine)
    common = [n for n in lists[0] if all(n in other for other in lists[1:])] if lists else []
    bad: list = []
    if lead:  # each committing rank verifies the candidates in its own folder, newest first, up to the first good one
        for name in reversed(common):
            try:
                verify_checkpoint(os.path.join(session.dirpath, name))
                break
            except CheckpointError as e:
                log.warning("lightning_ckpt: resume='auto' skips %s in %s: %s", name, session.dirpath, e)
                bad.append(name)
    dropped = {n for b in gather(bad if lead else None) for n in b}
    some = sorted({n for names in lists for n in names} - set(common))
    return [n for n in common if n not in dropped], some


def _step(path: Optional[str]) -> int:
    return int(read_checkpoint_manifest(path)["step"]) if path else -1


def auto_resume_path(session: "FolderSession", among: Optional[list[str]] = None, only_some: Iterable[str] = ()) -> Optional[str]:
    """The newest valid checkpoint among the folder and its backup locations (local wins a tie; an ``s3://`` dirpath:
    the newer of the staged and the uploaded ones); ``None`` when there is none. Raises when a backup location cannot
    be read and nothing is local (starting fresh could then silently drop a run). ``among``: node-local folders, the
    local checkpoints every folder holds (see :func:`common_local_names`); a newer backup is then read from S3 by
    every rank rather than pulled into one node's folder."""
    uris = list(session.uploaders)
    run = session.run_name

    def latest_checkpoint(where: Any) -> Optional[str]:
        return _latest(where, run_name=run)

    if among is not None:
        local = os.path.join(session.dirpath, among[-1]) if among else None
        if session.remote:  # only rank 0's staging folder is written: every node reads the uploaded checkpoints
            try:
                return latest_checkpoint(session.remote)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"resume='auto' cannot read {session.remote} ({e!r}); fix the S3 settings or "
                                      "the server, or drop resume='auto' to start fresh") from e
        local_step = _step(local)
        for uri in uris:
            try:
                remote = latest_checkpoint(uri)
            except Exception as e:  # noqa: BLE001 - S3 down: resume from the local one if there is one
                if local is None:
                    raise CheckpointError(f"resume='auto' found no checkpoint in every node's {session.dirpath} and "
                                          f"cannot read {uri} ({e!r}); fix the S3 settings or the server, or drop "
                                          "resume='auto' to start fresh") from e
                log.warning("lightning_ckpt: cannot read %s (%r); resuming from the local %s", uri, e, local)
                continue
            if _step(remote) > local_step:
                local, local_step = remote, _step(remote)
        if local is None and list(only_some):  # say, a node replaced by a machine with an empty disk
            raise CheckpointError(
                f"resume='auto': the node-local folders {session.dirpath} hold no checkpoint in common, but some hold "
                f"{', '.join(list(only_some)[-3:])}. Starting fresh would drop the run: copy a checkpoint folder from "
                "a node that has it to the nodes that lack it (each node's copy is whole), or pass ckpt_path, or "
                "set backup_uri so that a new node resumes from S3.")
        return local
    if session.remote:
        staged = latest_checkpoint(session.dirpath) if os.path.isdir(session.dirpath) else None
        try:
            remote = latest_checkpoint(session.remote)
        except Exception as e:  # noqa: BLE001
            if staged is not None:
                log.warning("lightning_ckpt: cannot read %s (%r); resuming from the staged %s", session.remote, e, staged)
                return staged
            raise CheckpointError(f"resume='auto' cannot read {session.remote} ({e!r}); fix the S3 settings or the "
                                  "server, or drop resume='auto' to start fresh") from e
        if staged is None or remote is None:
            return staged or remote
        return staged if _step(staged) >= _step(remote) else remote
    try:
        return resume_path(session.dirpath, uris, run_name=run)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. the S3 server is down and nothing is local
        raise CheckpointError(f"resume='auto' found no local checkpoint in {session.dirpath} and cannot read the "
                              f"backup locations {uris} ({e!r}); fix the S3 settings or the server, or drop "
                              "resume='auto' to start fresh") from e


def choose(session: "FolderSession", is_global_zero: bool, broadcast: Any) -> Optional[str]:
    """Collective: the checkpoint every rank of the run resumes from with ``resume="auto"`` (rank 0 decides; with
    node-local folders each node reads the same checkpoint name in its own folder). ``broadcast(obj)`` sends rank 0's
    object to every rank. Raises on every rank when rank 0 could not decide."""
    found, error, in_own_folder = None, None, False
    common, only_some = common_local_names(session) if session.writer.node_local else (None, [])
    if is_global_zero:
        try:
            found = auto_resume_path(session, among=common, only_some=only_some)
        except CheckpointError as e:
            error = str(e)
        if found and common is not None and not is_remote(found):
            found, in_own_folder = os.path.relpath(found, session.dirpath), True
    found, error, in_own_folder = broadcast((found, error, in_own_folder))
    if error is not None:
        raise CheckpointError(error)
    if in_own_folder:
        found = os.path.join(session.dirpath, found)
    return found
