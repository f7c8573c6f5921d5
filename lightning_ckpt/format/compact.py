"""The compact manifest layout (format version 3): what a manifest of many tensors looks like on disk.

A version 1/2 manifest spells every tensor out twice: its record in its file (``{dtype, shape, begin, end,
crc32c}``) and its index entry (``{dtype, shape, chunks: [{file, name, offsets, sizes}]}``), about 425 bytes per
tensor. Version 3 writes each file's (or pack's) tensors as columns, in file order::

    "files": {"model-rank00000.safetensors": {"size": .., "header_end": .., "header_crc32c": .., "rank": 0,
              "columns": {"name": [..], "key": [..], "dtype": [..], "shape": [..], "crc32c": [..],
                          "xxh128": [..]}}}

* ``begin``/``end`` are not written: the tensors tile the file from ``header_end`` in column order, each
  ``numel x itemsize`` bytes, so they follow from the order, the dtypes and the shapes;
* ``key`` is the index key of which that tensor is the whole, only chunk (``null`` for a shard or a tensor no index
  entry covers whole); such index entries are not written (they follow from the record), the others stay in
  ``tensors`` as before;
* ``xxh128`` only when some tensor of the file has one (``null`` for the others).

About 70 bytes per tensor, written and parsed by the C JSON codec. Parsing (:func:`expand`) turns it back into exactly
the version 1/2 structure, so every reader works on one shape; the checks that structure would get (regions tile the
file, ranges are shape x itemsize of a known dtype, index entries point to a listed record of the same dtype and shape)
hold by construction for what is expanded, and the rest is checked while expanding.
"""
from __future__ import annotations

import re
from itertools import chain
from math import prod
from typing import Any

from ..errors import CheckpointCorruptError

COMPACT_VERSION = 3
COMPACT_FROM = 256  # tensors in a manifest from which the writer uses version 3 (smaller ones stay readable by older
# releases; below this the compact layout saves little)
COLUMNS = "columns"
_RECORD_FIELDS = {"dtype", "shape", "begin", "end", "crc32c"}
_HASHED_FIELDS = _RECORD_FIELDS | {"xxh128"}
_INT, _STR, _KEY, _LIST = {int}, {str}, {str, type(None)}, {list}
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
MAX_DIMS = 64


def _corrupt(where: str, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{where} {what}; the manifest is corrupt or hostile. Use an earlier checkpoint "
                                  "(latest_checkpoint skips corrupt ones).")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def compact(m: dict, itemsize: dict[str, int]) -> dict:
    """The body of a version 3 manifest for the (expanded) manifest ``m``: each file and pack whose records are exactly
    representable as columns is written so, and each index entry that is one whole-tensor chunk of such a record is
    left out of ``tensors``. Anything else (a hand-edited or odd entry) is written as it is, so that parsing gives back
    ``m`` exactly and the validation sees what was there."""
    out = dict(m)
    index = m.get("tensors")
    if not isinstance(index, dict):
        return out
    # record (kind, file, name) -> the index key it is the whole, only chunk of
    whole: dict[tuple[str, str, str], str] = {}
    for key, t in index.items():
        if not (isinstance(t, dict) and len(t) == 3 and isinstance(t.get("chunks"), list) and len(t["chunks"]) == 1):
            continue
        c = t["chunks"][0]
        if not isinstance(c, dict) or len(c) != 4 or not isinstance(c.get("name"), str):
            continue
        kind = "file" if "file" in c else "pack" if "pack" in c else None
        shape = t.get("shape")
        if (kind is None or not isinstance(shape, list) or c.get("sizes") != shape
                or c.get("offsets") != [0] * len(shape) or not isinstance(c[kind], str)):
            continue
        whole[(kind, c[kind], c["name"])] = key
    used: set[str] = set()
    for kind, field in (("file", "files"), ("pack", "packs")):
        coll = m.get(field)
        if not isinstance(coll, dict):
            continue
        new = {}
        for fname, f in coll.items():
            cols = _columns(f, fname, kind, whole, index, itemsize)
            if cols is None:
                new[fname] = f
                continue
            used.update(k for k in cols["key"] if k is not None)
            new[fname] = {k: v for k, v in f.items() if k != "tensors"}
            new[fname][COLUMNS] = cols
        out[field] = new
    out["tensors"] = {k: v for k, v in index.items() if k not in used}
    return out


def _shape_ok(shape: Any) -> bool:
    return type(shape) is list and len(shape) <= MAX_DIMS and (
        not shape or (set(map(type, shape)) == _INT and min(shape) >= 0))


def _columns(f: Any, fname: str, kind: str, whole: dict, index: dict, itemsize: dict) -> dict | None:
    if not isinstance(f, dict) or not isinstance(f.get("tensors"), dict) or not f["tensors"] or COLUMNS in f:
        return None
    recs = f["tensors"]
    hend = f.get("header_end")
    if not _is_int(hend):
        return None
    order = list(recs.items())  # the writer lists them in file order; anything else is sorted first
    try:
        if any(order[i][1]["begin"] > order[i + 1][1]["begin"] for i in range(len(order) - 1)):
            order.sort(key=lambda kv: kv[1]["begin"])
    except (TypeError, KeyError, AttributeError):
        return None
    names, keys, dtypes, shapes, crcs, hashes = [], [], [], [], [], []
    pos = hend
    for name, r in order:
        if type(r) is not dict or not (r.keys() == _RECORD_FIELDS or r.keys() == _HASHED_FIELDS):
            return None
        dtype, shape = r["dtype"], r["shape"]
        if r["begin"] != pos or type(dtype) is not str or dtype not in itemsize or not _shape_ok(shape) or (
                type(r["crc32c"]) is not int):
            return None
        pos += prod(shape) * itemsize[dtype]
        if r["end"] != pos:
            return None
        key = whole.get((kind, fname, name))
        if key is not None:
            t = index[key]
            if t["dtype"] != dtype or t["shape"] != shape:
                key = None
        names.append(name)
        keys.append(key)
        dtypes.append(dtype)
        shapes.append(shape)
        crcs.append(r["crc32c"])
        hashes.append(r.get("xxh128"))
    cols = {"name": names, "key": keys, "dtype": dtypes, "shape": shapes, "crc32c": crcs}
    if any(h is not None for h in hashes):
        cols["xxh128"] = hashes
    return cols


def expand(m: dict, where: str, itemsize: dict[str, int]) -> tuple[dict, set[str], set[tuple[str, str]]]:
    """A parsed version 3 manifest in the version 1/2 structure; the index keys that were implied by the columns
    (correct by construction: the validation need not check them again); and the ``(field, name)`` of the file
    entries expanded here, which are checked here (sizes, regions tiling the file, dtypes, shapes, checksums' and
    hashes' types), so that the validation need not check them again either."""
    m = dict(m)
    explicit = m.get("tensors", {})
    if not isinstance(explicit, dict):
        raise CheckpointCorruptError(f"{where} has a malformed tensor index")
    implied: dict[str, dict] = {}
    checked: set[tuple[str, str]] = set()
    for kind, field in (("file", "files"), ("pack", "packs")):
        coll = m.get(field)
        if not isinstance(coll, dict):
            continue
        new = {}
        for fname, f in coll.items():
            if isinstance(f, dict) and COLUMNS in f:
                if not isinstance(fname, str):
                    raise _corrupt(where, "names a file that is not a string")
                fw = f"{where}: {kind} {fname[:80]!r}"
                f = _expand_file(f, fw, kind, fname, implied, explicit, itemsize)
                checked.add((field, fname))
            new[fname] = f
        m[field] = new
    index = implied
    index.update(explicit)
    m["tensors"] = index
    return m, set(implied), checked


def _expand_file(f: dict, fw: str, kind: str, fname: str, implied: dict, explicit: dict,
                 itemsize: dict[str, int]) -> dict:
    if "tensors" in f:
        raise _corrupt(fw, "lists its tensors twice")
    size, hend, hcrc = f.get("size"), f.get("header_end"), f.get("header_crc32c")
    if not (_is_int(size) and _is_int(hend) and _is_int(hcrc)) or size < 0 or not 8 <= hend <= size:
        raise _corrupt(fw, "has inconsistent sizes")
    cols = f[COLUMNS]
    if not isinstance(cols, dict):
        raise _corrupt(fw, "has malformed columns")
    names, keys, dtypes, shapes, crcs = (cols.get(c) for c in ("name", "key", "dtype", "shape", "crc32c"))
    hashes = cols.get("xxh128")
    n = len(names) if isinstance(names, list) else -1
    if n < 1 or not all(isinstance(c, list) and len(c) == n for c in (keys, dtypes, shapes, crcs)) or (
            hashes is not None and not (isinstance(hashes, list) and len(hashes) == n)):
        raise _corrupt(fw, "has columns of different lengths")
    recs: dict[str, dict] = {}
    pos = hend
    if not (set(map(type, names)) == _STR and set(map(type, dtypes)) == _STR and set(map(type, crcs)) == _INT
            and set(map(type, keys)) <= _KEY):
        raise _corrupt(fw, "has columns of the wrong types")
    if not set(dtypes) <= itemsize.keys():
        raise _corrupt(fw, f"has an unknown dtype {sorted(set(dtypes) - itemsize.keys())[0][:40]!r}")
    if len(set(names)) != n:
        raise _corrupt(fw, "has a repeated tensor name")
    if hashes is not None and not all(h is None or (type(h) is str and _HEX32.match(h)) for h in hashes):
        raise _corrupt(fw, "has a malformed content hash")
    if set(map(type, shapes)) != _LIST or max(map(len, shapes)) > MAX_DIMS:
        raise _corrupt(fw, "has an invalid shape")
    dims = list(chain.from_iterable(shapes))  # every dimension of every shape, checked at once
    if dims and (set(map(type, dims)) != _INT or min(dims) < 0):
        raise _corrupt(fw, "has an invalid shape")
    member = kind
    for i in range(n):
        name, dtype, shape = names[i], dtypes[i], shapes[i]
        begin = pos
        pos += prod(shape) * itemsize[dtype]
        rec = {"dtype": dtype, "shape": shape, "begin": begin, "end": pos, "crc32c": crcs[i]}
        if hashes is not None and hashes[i] is not None:
            rec["xxh128"] = hashes[i]
        recs[name] = rec
        key = keys[i]
        if key is not None:
            if key in implied or key in explicit:
                raise _corrupt(fw, f"claims the index key {key[:80]!r} twice")
            implied[key] = {"dtype": dtype, "shape": shape, "chunks": [
                {member: fname, "name": name, "offsets": [0] * len(shape), "sizes": list(shape)}]}
    if pos != size:
        raise CheckpointCorruptError(f"{fw}: its checksummed regions cover {pos} of {size} bytes")
    out = {k: v for k, v in f.items() if k != COLUMNS}
    out["tensors"] = recs
    return out
