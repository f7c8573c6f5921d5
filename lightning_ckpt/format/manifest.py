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

Every checksummed region of a file (``header_end`` bytes from 0, then each tensor's ``[begin, end)``) together
cover the whole file, so verifying them checks every byte.
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..errors import CheckpointCorruptError, CheckpointFormatError

FORMAT_NAME = "lightning_ckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest.json"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.=+@,-]+$")
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


def _need(d: dict, key: str, types: type | tuple, where: str) -> Any:
    if key not in d:
        raise CheckpointCorruptError(f"{where} lacks the field {key!r}; the manifest is corrupt")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and types is int):
        raise CheckpointCorruptError(f"{where} has a field {key!r} of the wrong type ({type(v).__name__})")
    return v


def validate_manifest(m: Any, where: str) -> dict:
    """Check the structure of a parsed manifest; raise a specific error on anything unexpected."""
    if not isinstance(m, dict):
        raise CheckpointCorruptError(f"{where} is not a JSON object; the manifest is corrupt")
    if m.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{where} is not a lightning_ckpt manifest (format={m.get('format')!r})")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointCorruptError(f"{where} has no valid format_version")
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where} uses checkpoint format version {version}, written by a newer lightning_ckpt release "
            f"(this release reads versions up to {FORMAT_VERSION}). Upgrade with `pip install -U lightning-ckpt`."
        )
    if version < 1:
        raise CheckpointFormatError(f"{where} has an unknown format_version {version}")
    _need(m, "step", int, where)
    files = _need(m, "files", dict, where)
    for fname, f in files.items():
        check_member_name(fname, where)
        fw = f"{where}: file {fname!r}"
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
        pos = hend
        for tname, t in sorted(tensors.items(), key=lambda kv: kv[1].get("begin", -1) if isinstance(kv[1], dict) else -1):
            tw = f"{fw} tensor {tname!r}"
            if not isinstance(t, dict):
                raise CheckpointCorruptError(f"{tw} entry is not an object")
            b, e = _need(t, "begin", int, tw), _need(t, "end", int, tw)
            _need(t, "crc32c", int, tw)
            _need(t, "dtype", str, tw)
            shape = _need(t, "shape", list, tw)
            if b != pos or e < b:
                raise CheckpointCorruptError(f"{tw} does not continue the file's byte ranges; the manifest is corrupt")
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                raise CheckpointCorruptError(f"{tw} has an invalid shape {shape!r}")
            pos = e
        if pos != size:
            raise CheckpointCorruptError(f"{fw}: its checksummed regions cover {pos} of {size} bytes")
    tensors = m.get("tensors", {})
    if not isinstance(tensors, dict):
        raise CheckpointCorruptError(f"{where} has a malformed tensor index")
    for key, t in tensors.items():
        tw = f"{where}: tensor {key!r}"
        if not isinstance(t, dict) or not isinstance(t.get("chunks"), list):
            raise CheckpointCorruptError(f"{tw} entry is malformed")
        for c in t["chunks"]:
            if not isinstance(c, dict) or c.get("file") not in files or c.get("name") not in files[c["file"]].get("tensors", {}):
                raise CheckpointCorruptError(f"{tw} points to a file or tensor the manifest does not list")
    state_files = m.get("state_files", {})
    if not isinstance(state_files, dict) or any(v not in files for v in state_files.values()):
        raise CheckpointCorruptError(f"{where} names a state file the manifest does not list")
    return m


def parse_manifest(raw: bytes, where: str) -> dict:
    """Parse and validate the bytes of a ``manifest.json`` (``where`` names it in errors)."""
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointCorruptError(f"{where} is not valid JSON ({e}); the checkpoint is corrupt, use an earlier one") from None
    return validate_manifest(m, where)


def dumps(m: dict) -> bytes:
    return json.dumps(m, indent=1, sort_keys=False, allow_nan=False).encode("utf-8")


def shard_file_name(group: str, rank: int) -> str:
    return f"{group}-rank{rank:05d}.safetensors"


def state_file_name(rank: int) -> str:
    return f"state-rank{rank:05d}.json"
