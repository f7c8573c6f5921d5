"""The manifest: ``manifest.json`` in each checkpoint folder, written last; its presence is the commit.

Layout (format version 1)::

    {
      "format": "lightning_ckpt", "format_version": 1,
      "name": "step=000120", "step": 120, "epoch": 3, "kind": "full", "world_size": 1,
      "tags": ["periodic"], "created_unix": 1.7e9,
      "files": {"model-rank00000.safetensors": {"size": .., "header_end": .., "header_crc32c": ..,
                                                "rank": 0, "tensors": {name: {dtype, shape, begin, end, crc32c}}},
                "state-rank00000.json": {"size": .., "header_end": size, "header_crc32c": .., "rank": 0}},
      "tensors": {key: {"dtype": "F32", "shape": [..], "chunks": [{"file", "name", "offsets": [..], "sizes": [..]}]}},
      "state_files": {"0": "state-rank00000.json"},
      "metrics": {..}, "hparams": {..}, "run": {..}, "timings": {..}, "resumed_from": null
    }

Manifests of many tensors are written in the compact layout of format version 3 (``format/compact.py``), which
parses into exactly this structure.

Every checksummed region of a file (``header_end`` bytes from 0, then each tensor's ``[begin, end)``) together
cover the whole file, so verifying them checks every byte. The manifest checks itself: its last field,
``manifest_sha256``, is the SHA-256 of its canonical JSON without that field, checked before anything else is read
from it; then :func:`validate_manifest` checks its structure before anything is allocated from it.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..errors import CheckpointCorruptError, CheckpointFormatError
from . import compact as _compact
from .gcpause import pausing

FORMAT_NAME = "lightning_ckpt"
FORMAT_VERSION = 3  # the newest this release reads: 2 = tensors may live in packs of the folder's content store,
# 3 = the compact layout of many tensors (format/compact.py)
PACKS_VERSION = 2  # what a manifest of few tensors that references packs is written as
PLAIN_VERSION = 1  # what is written when nothing needs version 2 (self-contained folders older releases read too)
COMPACT_VERSION = _compact.COMPACT_VERSION
COMPACT_FROM = _compact.COMPACT_FROM


def version_for(n_tensors: int, has_packs: bool) -> int:
    """The format version a writer gives a manifest: the compact layout from ``COMPACT_FROM`` tensors (where its size
    and parse time matter), else the oldest version that can say it (so small checkpoints stay readable by older
    releases)."""
    if n_tensors >= COMPACT_FROM:
        return COMPACT_VERSION
    return PACKS_VERSION if has_packs else PLAIN_VERSION
BLOBS = ".blobs"  # the content store of a folder: packs (safetensors files) that several checkpoints reference
PACK_RE = re.compile(r"pack-[0-9a-f]{8}-[0-9]{1,9}-rank[0-9]{5}\.safetensors\Z")


def pack_name(save_id: str, rank: int) -> str:
    """The name of the pack one rank writes in one save (``save_id``: ``<writer id>-<sequence number>``)."""
    return f"pack-{save_id}-rank{int(rank):05d}.safetensors"

STATE_KEY = "lightning_ckpt"  # this package's own entry in a checkpoint dictionary: {"format", "kind", "rng"}
MANIFEST = "manifest.json"
LATEST = "latest.json"

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.=+@,-]+\Z")  # \Z, not $: "$" also matches before a final "\n"
MAX_NAME = 200


def is_plain_name(name: Any) -> bool:
    """A name that can only mean a direct child of a folder: letters, digits and ``_.=+@,-``, no leading dot."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME and name not in (".", "..")
            and not name.startswith(".") and bool(_SAFE_NAME.match(name)))


def check_member_name(name: Any, where: str) -> str:
    """A file named by a manifest must be a plain name inside the checkpoint folder."""
    if not is_plain_name(name):
        raise CheckpointCorruptError(
            f"{where} names a file {name!r} outside the checkpoint folder or with a forbidden name; "
            "the manifest is corrupt or hostile. Do not load this checkpoint; use an earlier one."
        )
    return name


# bytes per element of every dtype name a tensor file may hold (safetensors names)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8, "U16": 2, "U32": 4, "U64": 8}
MAX_DIMS = 64
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_RANK = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes "²" and "٣"
MAX_CHUNKS = 4096  # chunks of one tensor (one per shard); tiling is checked pairwise below this bound
DIGEST = "manifest_sha256"  # the SHA-256 of the manifest's canonical JSON without this field


def _corrupt(where: str, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{where} {what}; the manifest is corrupt or hostile. Use an earlier checkpoint "
                                  "(latest_checkpoint skips corrupt ones).")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(d: dict, key: str, types: type | tuple, where: str) -> Any:
    if key not in d:
        raise CheckpointCorruptError(f"{where} lacks the field {key!r}; the manifest is corrupt")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and types is int):
        raise CheckpointCorruptError(f"{where} has a field {key!r} of the wrong type ({type(v).__name__})")
    return v


def _shape(v: Any, where: str) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_DIMS or not all(_is_int(s) and s >= 0 for s in v):
        raise _corrupt(where, f"has an invalid shape {str(v)[:80]}")
    return v


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_tiling(chunks: list[tuple[list[int], list[int]]], shape: list[int], where: str) -> None:
    """The chunks (offsets, sizes) lie inside ``shape``, do not overlap, and together cover it exactly."""
    total = 0
    for off, size in chunks:
        if len(off) != len(shape) or len(size) != len(shape):
            raise _corrupt(where, "has a chunk whose rank differs from the tensor's")
        if any(o + n > d for o, n, d in zip(off, size, shape)):
            raise _corrupt(where, "has a chunk outside the tensor's shape")
        total += _numel(size)
    if total != _numel(shape):
        raise _corrupt(where, f"has chunks covering {total} of its {_numel(shape)} elements")
    boxes = [(off, size) for off, size in chunks if _numel(size)]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            (oa, sa), (ob, sb) = boxes[i], boxes[j]
            if all(a < b + n and b < a + m for a, m, b, n in zip(oa, sa, ob, sb)):
                raise _corrupt(where, "has overlapping chunks")


def _check_file_entry(f: Any, fw: str) -> None:
    """A file entry (of ``files`` or ``packs``): sizes, and checksummed regions that tile the file, each tensor's range
    exactly shape x itemsize of a known dtype."""
    if not isinstance(f, dict):
        raise CheckpointCorruptError(f"{fw} entry is not an object")
    size = _need(f, "size", int, fw)
    hend = _need(f, "header_end", int, fw)
    _need(f, "header_crc32c", int, fw)
    if size < 0 or not 0 <= hend <= size:
        raise CheckpointCorruptError(f"{fw} has inconsistent sizes")
    tensors = f.get("tensors", {})
    if not isinstance(tensors, dict):
        raise CheckpointCorruptError(f"{fw} has a malformed tensor list")
    if tensors and hend < 8:
        raise _corrupt(fw, "has a header too short for a safetensors file")
    pos = hend
    for tname, t in sorted(tensors.items(), key=lambda kv: kv[1].get("begin", -1) if isinstance(kv[1], dict)
                           and _is_int(kv[1].get("begin")) else -1):
        tw = f"{fw} tensor {tname!r}"
        if not isinstance(t, dict):
            raise CheckpointCorruptError(f"{tw} entry is not an object")
        b, e = _need(t, "begin", int, tw), _need(t, "end", int, tw)
        _need(t, "crc32c", int, tw)
        dtype = _need(t, "dtype", str, tw)
        shape = _shape(_need(t, "shape", list, tw), tw)
        if b != pos or e < b:
            raise CheckpointCorruptError(f"{tw} does not continue the file's byte ranges; the manifest is corrupt")
        if dtype not in ITEMSIZE:
            raise _corrupt(tw, f"has an unknown dtype {dtype[:40]!r}")
        if _numel(shape) * ITEMSIZE[dtype] != e - b:
            raise _corrupt(tw, f"spans {e - b} bytes where its shape and dtype need {_numel(shape) * ITEMSIZE[dtype]}")
        if "xxh128" in t and not (isinstance(t["xxh128"], str) and _HEX32.match(t["xxh128"])):
            raise _corrupt(tw, "has a malformed content hash")
        pos = e
    if pos != size:
        raise CheckpointCorruptError(f"{fw}: its checksummed regions cover {pos} of {size} bytes")


def chunk_record(m: dict, c: Any) -> dict | None:
    """The stored tensor record a chunk of the index points to (in a file of the checkpoint, or in a pack of the
    folder's content store), or None when the chunk is malformed or points nowhere."""
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
        return None
    if "pack" in c:
        where, name = m.get("packs") or {}, c["pack"]
    else:
        where, name = m.get("files") or {}, c.get("file")
    if not isinstance(name, str) or name not in where:
        return None
    return (where[name].get("tensors") or {}).get(c["name"])


def chunk_member(c: dict) -> tuple[str, str]:
    """``("file", name)`` for a chunk stored in the checkpoint's own folder, ``("pack", name)`` for one in the content
    store (``<folder>/.blobs/``) that several checkpoints share."""
    return ("pack", c["pack"]) if "pack" in c else ("file", c["file"])


def _opt_str(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= 4096)


def _check_records(m: dict, where: str) -> None:
    """The records the tools read beside the data (lineage, ranking rules, the resume source): their types, so that a
    hostile value is a corrupt manifest rather than a TypeError in ``lineage``, ``ls`` or ``ckpt_path="best"``."""
    lin = m.get("lineage")
    if lin is not None and not (isinstance(lin, dict) and isinstance(lin.get("run"), str) and len(lin["run"]) <= 256
                                and _opt_str(lin.get("run_name")) and _opt_str(lin.get("parent"))
                                and isinstance(lin.get("branch", False), bool)):
        raise _corrupt(where, "has a malformed lineage record")
    rules = m.get("best_rule")
    if rules is not None and not (isinstance(rules, list) and len(rules) <= 64 and all(
            isinstance(r, dict) and isinstance(r.get("monitor"), str) and r.get("mode", "min") in ("min", "max")
            and (r.get("top_k") is None or (_is_int(r["top_k"]))) for r in rules)):
        raise _corrupt(where, "has a malformed best_rule record")
    if not _opt_str(m.get("resumed_from")):
        raise _corrupt(where, "has a malformed resumed_from record")


def validate_manifest(m: Any, where: str, implied: set[str] = frozenset(),
                      checked: set[tuple[str, str]] = frozenset()) -> dict:
    """Check the structure of a parsed manifest before anything is allocated or read from it: every field of the
    right type, every file's checksummed regions tiling it, every tensor's byte range exactly shape x itemsize of a
    known dtype, every index entry's chunks tiling its shape and pointing to a listed tensor of the same dtype and
    size. Raises CheckpointCorruptError (CheckpointFormatError for another or a newer format)."""
    if not isinstance(m, dict):
        raise CheckpointCorruptError(f"{where} is not a JSON object; the manifest is corrupt")
    if m.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{where} is not a lightning_ckpt manifest (format={str(m.get('format'))[:80]!r})")
    version = m.get("format_version")
    if not _is_int(version):
        raise CheckpointCorruptError(f"{where} has no valid format_version")
    if version > FORMAT_VERSION:
        err = CheckpointFormatError(
            f"{where} uses checkpoint format version {version}, written by a newer lightning_ckpt release "
            f"(this release reads versions up to {FORMAT_VERSION}). Upgrade with `pip install -U lightning-ckpt`."
        )
        err.newer = True
        raise err
    if version < 1:
        raise CheckpointFormatError(f"{where} has an unknown format_version {version}")
    step = _need(m, "step", int, where)
    if step < 0:
        raise _corrupt(where, f"has a negative step {step}")
    for key, types in (("epoch", (int, type(None))), ("tags", (list, type(None))), ("metrics", (dict, type(None))),
                       ("kind", (str, type(None))), ("world_size", (int, type(None))), ("name", (str, type(None))),
                       ("created_unix", (int, float, type(None)))):
        if key in m and (not isinstance(m[key], types) or isinstance(m[key], bool)):
            raise _corrupt(where, f"has a field {key!r} of the wrong type ({type(m[key]).__name__})")
    if not all(isinstance(t, str) for t in m.get("tags") or []):
        raise _corrupt(where, "has a tag that is not a string")
    _check_records(m, where)
    files = _need(m, "files", dict, where)
    for fname, f in files.items():
        check_member_name(fname, where)
        if ("files", fname) not in checked:  # (a compact entry was checked while it was expanded)
            _check_file_entry(f, f"{where}: file {fname!r}")
    packs = m.get("packs", {})
    if not isinstance(packs, dict) or (packs and version < 2):
        raise _corrupt(where, "has a malformed pack list")
    for pname, f in packs.items():
        if not isinstance(pname, str) or not PACK_RE.match(pname):
            raise _corrupt(where, f"references a pack named {str(pname)[:80]!r}, which is not a pack name")
        if ("packs", pname) not in checked:
            _check_file_entry(f, f"{where}: pack {pname!r}")
        if not f.get("tensors"):
            raise _corrupt(where, f"lists a pack {pname!r} without tensors")
    tensors = m.get("tensors", {})
    if not isinstance(tensors, dict):
        raise CheckpointCorruptError(f"{where} has a malformed tensor index")
    for key, t in tensors.items():
        if key in implied:  # one whole chunk of a record it was made from (format/compact.py): right by construction
            continue
        tw = f"{where}: tensor {key!r}"
        if not isinstance(t, dict) or not isinstance(t.get("chunks"), list) or not isinstance(t.get("dtype"), str):
            raise CheckpointCorruptError(f"{tw} entry is malformed")
        shape = _shape(t.get("shape"), tw)
        if t["dtype"] not in ITEMSIZE:
            raise _corrupt(tw, f"has an unknown dtype {t['dtype'][:40]!r}")
        if not t["chunks"] and _numel(shape) or len(t["chunks"]) > MAX_CHUNKS:
            raise _corrupt(tw, f"has {len(t['chunks'])} chunks")
        chunks = []
        for c in t["chunks"]:
            rec = chunk_record(m, c)
            if rec is None:
                raise CheckpointCorruptError(f"{tw} points to a file or tensor the manifest does not list")
            off, size = _shape(c.get("offsets"), tw), _shape(c.get("sizes"), tw)
            if rec["shape"] != size or rec["dtype"] != t["dtype"]:
                raise _corrupt(tw, f"has a chunk whose stored tensor {c['name'][:80]!r} has another shape or dtype")
            chunks.append((off, size))
        _check_tiling(chunks, shape, tw)
    state_files = m.get("state_files", {})
    if not isinstance(state_files, dict) or any(not isinstance(v, str) or v not in files or files[v].get("tensors")
                                                for v in state_files.values()):
        raise CheckpointCorruptError(f"{where} names a state file the manifest does not list")
    if not all(isinstance(r, str) and _RANK.fullmatch(r) for r in state_files):
        raise _corrupt(where, "names a state file of an invalid rank")
    return m


def canonical(m: dict) -> bytes:
    """The bytes the manifest's digest covers: canonical JSON of every field but the digest."""
    body = {k: v for k, v in m.items() if k != DIGEST}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def summary_of(m: dict) -> dict:
    """A parsed manifest without its per-tensor parts (the index ``tensors`` and each file's and pack's tensor
    records): what a listing keeps of each checkpoint. Those parts grow with the tensors (58 MB of Python objects for
    a manifest of 50,000 tensors, 3 MB on disk) and no listing reader needs them; loads, verification and the tools
    read the manifest itself."""
    out = {k: v for k, v in m.items() if k != "tensors"}
    for part in ("files", "packs"):
        entries = m.get(part)
        if isinstance(entries, dict):
            out[part] = {f: {k: v for k, v in e.items() if k not in ("tensors", "columns")} if isinstance(e, dict) else e
                         for f, e in entries.items()}
    return out


@pausing
def parse_manifest(raw: bytes, where: str) -> dict:
    """Parse the bytes of a ``manifest.json``, check its digest first (when it has one: manifests written before
    the digest existed have none), then validate its structure (``where`` names it in errors)."""
    try:
        m = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise CheckpointCorruptError(f"{where} is not valid JSON ({str(e)[:200]}); the checkpoint is corrupt, use an "
                                     "earlier one") from None
    version = m.get("format_version") if isinstance(m, dict) else None
    if _is_int(version) and version > FORMAT_VERSION:
        return validate_manifest(m, where)  # a newer release's: says to upgrade (its digest may be another kind)
    if _is_int(version) and version >= COMPACT_VERSION and m.get("format") == FORMAT_NAME:
        _check_raw_digest(raw, m, where)
        m, implied, checked = _compact.expand(m, where, ITEMSIZE)
        return validate_manifest(m, where, implied, checked)
    if isinstance(m, dict) and DIGEST in m:
        digest = m[DIGEST]
        try:
            body = canonical(m)
        except (TypeError, ValueError, RecursionError):
            raise CheckpointCorruptError(f"{where} cannot be checked against its digest; it is corrupt") from None
        if not isinstance(digest, str) or digest != hashlib.sha256(body).hexdigest():
            raise CheckpointCorruptError(f"{where} does not match its own checksum (manifest_sha256): it was damaged "
                                         "or edited. Use an earlier checkpoint (latest_checkpoint skips corrupt ones).")
    return validate_manifest(m, where)


_DIGEST_TAIL = re.compile(rb',"' + DIGEST.encode() + rb'":"([0-9a-f]{64})"\}\s*$')


def _check_raw_digest(raw: bytes, m: dict, where: str) -> None:
    """Version 3: the digest is the SHA-256 of the bytes written before it (the body as written, closed with ``}``),
    so checking it needs no second encoding of a large manifest."""
    got = _DIGEST_TAIL.search(raw, max(0, len(raw) - 200))
    if got is None or m.get(DIGEST) != got.group(1).decode():
        raise CheckpointCorruptError(f"{where} does not end with its checksum (manifest_sha256); it was damaged or "
                                     "edited. Use an earlier checkpoint (latest_checkpoint skips corrupt ones).")
    if hashlib.sha256(raw[:got.start()] + b"}").hexdigest() != m[DIGEST]:
        raise CheckpointCorruptError(f"{where} does not match its own checksum (manifest_sha256): it was damaged "
                                     "or edited. Use an earlier checkpoint (latest_checkpoint skips corrupt ones).")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def dumps(m: dict) -> bytes:
    """The bytes of a manifest, with its digest (``manifest_sha256``) as the last field."""
    body = {k: v for k, v in m.items() if k != DIGEST}
    version = body.get("format_version")
    if _is_int(version) and version >= COMPACT_VERSION:  # the body as written, then its digest (_check_raw_digest)
        raw = json.dumps(_compact.compact(body, ITEMSIZE), separators=(",", ":"), ensure_ascii=False,
                         allow_nan=False).encode("utf-8")
        return raw[:-1] + b',"%s":"%s"}' % (DIGEST.encode(), hashlib.sha256(raw).hexdigest().encode())
    body[DIGEST] = hashlib.sha256(canonical(body)).hexdigest()
    # no indent: json.dumps with indent takes Python's pure encoder (about 8 s for 50,000 tensors' manifest)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def shard_file_name(group: str, rank: int) -> str:
    return f"{group}-rank{rank:05d}.safetensors"


def state_file_name(rank: int) -> str:
    return f"state-rank{rank:05d}.json"
