"""A self-contained copy of one checkpoint: ``lightning-ckpt export --standalone CKPT DEST``.

A deduplicated checkpoint (manifest format 2) references packs of its folder's content store (``.blobs/``); copied
out alone it would be missing them. The standalone copy holds every byte it needs in its own folder: each pack it
references becomes one of its files, the chunks point at those files, and the manifest is format 1 again (readable
by releases that predate deduplication). The copy is a transaction of the destination folder (nothing partial is
ever listed) and is verified byte by byte before it is committed.
"""
from __future__ import annotations

import copy
import os
import shutil
from typing import Any, Optional

from ..format import manifest as mf
from ..read import _verify_files, open_checkpoint, Opened
from ..store import LocalStore
from ..store.fs import OPS, open_member


def standalone_manifest(m: dict) -> dict:
    """The manifest of the same checkpoint with every pack it references as a file of its own."""
    out = copy.deepcopy(m)
    packs = out.pop("packs", None) or {}
    for pname, entry in packs.items():
        if pname in out["files"]:
            raise ValueError(f"the checkpoint has both a file and a pack named {pname!r}")
        out["files"][pname] = entry
    for t in out.get("tensors", {}).values():
        for c in t["chunks"]:
            if "pack" in c:
                c["file"] = c.pop("pack")
    out["format_version"] = mf.version_for(len(out.get("tensors") or {}), False)
    out.pop(mf.DIGEST, None)
    return out


def export_standalone(path: Any, dest_dir: Any, *, name: Optional[str] = None) -> str:
    """Copy the checkpoint at ``path`` (local or ``s3://``) into ``dest_dir/<name>`` (default: its own name) as a
    self-contained checkpoint. Returns the new checkpoint's path. Raises ``FileExistsError`` when the name is taken."""
    ck = open_checkpoint(path, everything=True)
    m = standalone_manifest(ck.m)
    name = name or ck.name
    local = LocalStore(dest_dir)
    local.makedirs()
    if os.path.lexists(local.path(name)):
        raise FileExistsError(f"{local.path(name)} exists; choose another destination or name")
    raw = mf.dumps(m)
    mf.parse_manifest(raw, "the standalone manifest")
    tx = local.begin(name).open()
    try:
        for key in ck.members():
            folder, fname, entry = ck.where(key)
            fd = open_member(folder, fname, entry["size"], where=os.path.join(folder, fname))
            with os.fdopen(fd, "rb") as src, open(tx.file(fname), "xb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
                if local.fsync:
                    dst.flush()
                    os.fsync(dst.fileno())
        tx.sync()
        _verify_files(Opened(local, name, m, raw, tx.path), None)
        committed = tx.commit(raw, name=name, if_exists="discard")
    except BaseException:
        tx.abort()
        raise
    if committed is None:
        raise FileExistsError(f"{local.path(name)} was created while the copy was being written")
    if local.fsync:
        OPS.fsync_dir(local.root)
    return local.path(committed)
