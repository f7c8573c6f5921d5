"""A self-contained copy of one checkpoint: ``lightning-ckpt export --standalone CKPT DEST``.

A deduplicated checkpoint (manifest format 2) keeps frozen parameters, buffers and unchanged tensors in packs of its
folder's content store (``.blobs/``), so its own ``model-rank00000.safetensors`` lacks them. The standalone copy holds
every byte it needs in its own folder, laid out as a checkpoint written with ``dedup=False``: each tensor a pack held
is written into the file of its group and rank (a model tensor of rank 0 into ``model-rank00000.safetensors``, under
the model's own name), so for a checkpoint written by one process ``safetensors.torch.load_file`` of that one file
returns the whole model state dict. The chunks point at those files and the manifest is format 1 again (readable by
releases that predate deduplication). Files that gain nothing are copied byte for byte; the others are written anew
from the source bytes, each tensor keeping its CRC32C (and content hash), so the copy is verified byte by byte against
the source's checksums before it is committed, as a transaction of the destination folder (nothing partial is ever
listed).
"""
from __future__ import annotations

import copy
import os
import re
import shutil
from typing import Any, Optional

from ..dcp import group_of, name_in_file
from ..format import manifest as mf
from ..format.checksum import crc32c
from ..format.tensorfile import dtype_from_name, header_bytes
from ..read import Opened, open_checkpoint, verify_files
from ..store import LocalStore
from ..store.fs import OPS, open_member

_PACK_RANK = re.compile(r"-rank([0-9]{5})\.safetensors\Z")
_METADATA = {"format": "pt", "lightning_ckpt": str(mf.PLAIN_VERSION)}  # what the writer puts in every tensor file
Source = tuple[tuple[str, str], str]  # (member of the source checkpoint, tensor name in it)


def standalone_layout(m: dict) -> tuple[dict, dict[str, list[tuple[str, Source]]]]:
    """The manifest of the same checkpoint without packs, its ``files`` not yet filled in for the files that change,
    and for each such file the tensors it holds, in order: ``[(name in the file, (source member, source name))]``.
    A tensor a pack held moves into the file of its key's group and the pack's rank, under the name the writer gives
    it there; a file of the checkpoint that gains tensors keeps its own first."""
    out = copy.deepcopy(m)
    out.pop("packs", None)
    out.pop(mf.DIGEST, None)
    out["format_version"] = mf.version_for(len(out.get("tensors") or {}), False)
    changed: dict[str, list[tuple[str, Source]]] = {}
    for key in sorted(out.get("tensors", {})):
        t = out["tensors"][key]
        for c in t["chunks"]:
            if "pack" not in c:
                continue
            pack = c.pop("pack")
            target = mf.shard_file_name(group_of(key), int(_PACK_RANK.search(pack).group(1)))
            if target not in changed:
                own = (m["files"].get(target) or {}).get("tensors") or {}
                changed[target] = [(n, (("file", target), n)) for n in sorted(own, key=lambda n: own[n]["begin"])]
            name = name_in_file(key, tuple(c["offsets"]), list(c["sizes"]) != list(t["shape"]))
            if any(n == name for n, _ in changed[target]):
                raise ValueError(f"{target} would hold two tensors named {name!r}; this checkpoint cannot be laid out "
                                 "without its content store")
            changed[target].append((name, (("pack", pack), c["name"])))
            c["file"], c["name"] = target, name
    for target in changed:
        if target in out["files"] and not out["files"][target].get("tensors"):
            raise ValueError(f"the checkpoint has a file {target!r} that is not a tensor file")
    return out, changed


def _write_file(ck: Opened, path: str, tensors: list[tuple[str, Source]], rank: int, fsync: bool) -> dict:
    """Write one tensor file of the copy from the source's bytes; returns its manifest entry (each tensor with the
    CRC32C and content hash the source recorded for its bytes: the copy's verification compares them)."""
    recs = [ck.entry(member)["tensors"][src] for _, (member, src) in tensors]
    header, offsets = header_bytes([(n, dtype_from_name(r["dtype"]), r["shape"], r["end"] - r["begin"])
                                    for (n, _), r in zip(tensors, recs)], _METADATA)
    base = len(header)
    entry: dict = {"size": base + (offsets[-1][1] if offsets else 0), "header_end": base,
                   "header_crc32c": crc32c(header), "rank": rank, "tensors": {}}
    fds: dict[tuple[str, str], Any] = {}
    try:
        with open(path, "xb") as dst:
            dst.write(header)
            for (name, (member, _)), r, (b, e) in zip(tensors, recs, offsets):
                if member not in fds:
                    folder, fname, ent = ck.where(member)
                    fds[member] = os.fdopen(open_member(folder, fname, ent["size"]), "rb", buffering=0)
                src = fds[member]
                src.seek(r["begin"])
                left = r["end"] - r["begin"]
                while left:
                    piece = src.read(min(left, 8 << 20))
                    if not piece:
                        raise OSError(f"{ck.where(member)[1]} ended early while it was copied")
                    dst.write(piece)
                    left -= len(piece)
                rec = {"dtype": r["dtype"], "shape": list(r["shape"]), "begin": base + b, "end": base + e,
                       "crc32c": r["crc32c"]}
                if r.get("xxh128") is not None:
                    rec["xxh128"] = r["xxh128"]
                entry["tensors"][name] = rec
            if fsync:
                dst.flush()
                os.fsync(dst.fileno())
    finally:
        for f in fds.values():
            f.close()
    return entry


def export_standalone(path: Any, dest_dir: Any, *, name: Optional[str] = None) -> str:
    """Copy the checkpoint at ``path`` (local or ``s3://``) into ``dest_dir/<name>`` (default: its own name) as a
    self-contained checkpoint whose tensor files hold every tensor (for one process: ``model-rank00000.safetensors``
    is the whole model state dict). Returns the new checkpoint's path. Raises ``FileExistsError`` when the name is
    taken."""
    ck = open_checkpoint(path, everything=True)
    m, changed = standalone_layout(ck.m)
    name = name or ck.name
    local = LocalStore(dest_dir)
    local.makedirs()
    if os.path.lexists(local.path(name)):
        raise FileExistsError(f"{local.path(name)} exists; choose another destination or name")
    tx = local.begin(name).open()
    try:
        for fname in sorted(m["files"]):  # the files that gain nothing: byte for byte
            if fname in changed:
                continue
            folder, _, entry = ck.where(("file", fname))
            fd = open_member(folder, fname, entry["size"], where=os.path.join(folder, fname))
            with os.fdopen(fd, "rb") as src, open(tx.file(fname), "xb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
                if local.fsync:
                    dst.flush()
                    os.fsync(dst.fileno())
        for fname, tensors in sorted(changed.items()):
            rank = int(_PACK_RANK.search(fname).group(1))
            m["files"][fname] = _write_file(ck, tx.file(fname), tensors, rank, local.fsync)
        raw = mf.dumps(m)
        mf.parse_manifest(raw, "the standalone manifest")
        tx.sync()
        verify_files(Opened(local, name, mf.parse_manifest(raw, "the standalone manifest"), raw, tx.path), None)
        committed = tx.commit(raw, name=name, if_exists="discard")
    except BaseException:
        tx.abort()
        raise
    if committed is None:
        raise FileExistsError(f"{local.path(name)} was created while the copy was being written")
    if local.fsync:
        OPS.fsync_dir(local.root)
    return local.path(committed)
