"""How a stage result is stored: a committed entry of the stage's folder (``<cache>/<stage>/<fingerprint>/``) with
``output.safetensors`` (every tensor and numpy array), ``value.json`` (the structure around them, no pickle) and
``manifest.json`` (sizes and CRC32C of every byte), written through the store's commit protocol. Loading checks every
byte and refuses any ``value.json`` content a stage result never holds."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch

from ..errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError
from ..format import manifest as mf
from ..format.checksum import crc32c
from ..format.codec import decode, encode
from ..format.tensorfile import byte_view, dtype_from_name, header_end_from_prefix, readinto_exact
from ..policy.enums import Kind
from ..read import read_state_doc
from ..store import LocalStore
from ..store.fs import open_member
from .fingerprint import canonical, check_no_objects, plain_tensor, remember_crc

KIND = Kind.STAGE.value  # the manifest kind (and tag) of a stage result, a plain string
STAGE_FORMAT_VERSION = 1
TENSOR_FILE = "output.safetensors"
VALUE_FILE = "value.json"
_KEY_PREFIX = "v"  # tensor names in output.safetensors: "v" (the output itself) or "v/<path>"
# tags of lightning_ckpt.format.codec that a stage result may contain; anything else in value.json is refused
_ALLOWED_TAGS = {"$t", "$np", "$tuple", "$dict", "$float", "$set", "$bytes", "$npscalar", "$size", "$dtype", "$path"}


def load_result(path: str, fp: str, verify: bool = True) -> Any:
    """Read a committed result, checking every byte. Raises a CheckpointError subclass on anything wrong."""
    parent, base = os.path.split(path)
    m = LocalStore(parent).read_manifest(base)[0]
    info = m.get("stage")
    if m.get("kind") != KIND or not isinstance(info, dict) or info.get("fingerprint") != fp:
        raise CheckpointCorruptError(f"{path} is not the cached result of fingerprint {fp[:16]}...")
    if info.get("format_version") != STAGE_FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{path} was written in stage format {info.get('format_version')!r}; this release reads "
            f"{STAGE_FORMAT_VERSION}"
        )
    if set(m["files"]) - {TENSOR_FILE, VALUE_FILE} or m.get("state_files") != {"0": VALUE_FILE}:
        raise CheckpointCorruptError(f"{path}: the manifest lists unexpected files {sorted(m['files'])}")
    tensors = _read_tensors(path, m, verify) if TENSOR_FILE in m["files"] else {}
    doc = read_state_doc(path, m)  # size, CRC32C and JSON checked
    _check_tags(doc, path)

    def get(key: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointCorruptError(f"{path}: value.json refers to tensor {key!r}, which the file lacks")
        return tensors[key]

    return decode(doc, get)

def _read_tensors(path: str, m: dict, verify: bool) -> dict[str, torch.Tensor]:
    entry = m["files"][TENSOR_FILE]
    fpath = os.path.join(path, TENSOR_FILE)
    out: dict[str, torch.Tensor] = {}
    with os.fdopen(open_member(path, TENSOR_FILE, entry["size"], where=fpath), "rb", buffering=0) as f:
        size = entry["size"]
        head_end = header_end_from_prefix(f.read(8), size, fpath)
        if head_end != entry["header_end"]:
            raise CheckpointCorruptError(f"{fpath} has a header that does not match the manifest")
        f.seek(0)
        head = bytearray(head_end)
        readinto_exact(f, memoryview(head), fpath)
        if verify and crc32c(head) != entry["header_crc32c"]:
            raise CheckpointCorruptError(f"{fpath}: checksum mismatch in its header; the file is corrupt")
        try:
            header = json.loads(bytes(head[8:]))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointCorruptError(f"{fpath} has a header that is not valid JSON ({e})") from None
        listed = entry.get("tensors", {})
        if not isinstance(header, dict) or set(header) - {"__metadata__"} != set(listed):
            raise CheckpointCorruptError(f"{fpath}: its header and the manifest list different tensors")
        for name, rec in listed.items():
            h = header[name]
            dtype = dtype_from_name(rec["dtype"])
            shape = [int(s) for s in rec["shape"]]
            begin, end = int(rec["begin"]), int(rec["end"])
            if (
                not isinstance(h, dict)
                or h.get("dtype") != rec["dtype"]
                or h.get("shape") != shape
                or h.get("data_offsets") != [begin - head_end, end - head_end]
                or math.prod(shape) * dtype.itemsize != end - begin
            ):
                raise CheckpointCorruptError(f"{fpath}: tensor {name!r} is described differently by header and manifest")
            t = torch.empty(shape, dtype=dtype)
            view = byte_view(t)
            f.seek(begin)
            readinto_exact(f, view, fpath)
            if verify:  # unverified bytes get no remembered checksum: the next stage hashes them
                crc = crc32c(view)
                if crc != rec["crc32c"]:
                    raise CheckpointCorruptError(
                        f"{fpath}: checksum mismatch in tensor {name!r} (bytes [{begin}, {end})); the file is corrupt"
                    )
                remember_crc(t, crc)
            out[name] = t
    return out

def write_result(final: str, stage_info: dict, value: Any, fsync: bool) -> str:
    """Commit ``value`` as the result ``final`` (``<cache>/<stage>/<fingerprint>``); returns the committed folder
    (another process's if it committed the same result first). ``stage_info``: name, fingerprint, version, compute_s
    and key of the call, recorded in the manifest."""
    sdir, fp = os.path.split(final)
    name = stage_info["name"]
    os.makedirs(sdir, exist_ok=True)
    check_no_objects(value, f"the output of stage {name!r}")
    doc, tensors = encode(value, key_fn=lambda k: f"{_KEY_PREFIX}/{k}" if k else _KEY_PREFIX)
    plain = [(k, plain_tensor(t)) for k, t in tensors.items()]
    store = LocalStore(sdir, fsync=fsync)
    tx = store.begin(fp)
    try:
        tx.open()
        files = {}
        if plain:
            rec = tx.write_tensors(TENSOR_FILE, plain)
            files[TENSOR_FILE] = {
                "size": rec.size,
                "header_end": rec.header_end,
                "header_crc32c": rec.header_crc32c,
                "tensors": {t.name: t.to_json() for t in rec.tensors},
            }
            for (_, t), tr in zip(tensors.items(), rec.tensors):
                if isinstance(t, torch.Tensor):
                    remember_crc(t, tr.crc32c)
        vrec = tx.write_bytes(VALUE_FILE, canonical(doc))
        files[VALUE_FILE] = {"size": vrec.size, "header_end": vrec.header_end, "header_crc32c": vrec.header_crc32c}
        m = {
            "format": mf.FORMAT_NAME,
            "format_version": mf.PLAIN_VERSION,
            "kind": KIND,
            "name": fp,
            "step": 0,
            "epoch": None,
            "tags": [KIND],
            "created_unix": time.time(),
            "stage": {"format_version": STAGE_FORMAT_VERSION, **stage_info},
            "files": files,
            "tensors": {
                k: {
                    "dtype": r["dtype"],
                    "shape": r["shape"],
                    "chunks": [{"file": TENSOR_FILE, "name": k, "offsets": [0] * len(r["shape"]), "sizes": r["shape"]}],
                }
                for k, r in files.get(TENSOR_FILE, {}).get("tensors", {}).items()
            },
            "state_files": {"0": VALUE_FILE},
            "metrics": {},
            "hparams": {},
        }
        raw = mf.dumps(m)
        mf.parse_manifest(raw, "the stage manifest being written")
        tx.commit(raw, if_exists="discard")  # another process may have committed it first: then theirs stays
    except CheckpointError:
        tx.abort()
        raise
    except OSError as e:
        tx.abort()
        raise CheckpointWriteError(
            f"could not cache the result of stage {name!r} in {sdir}: {e}. Free disk space or fix the "
            "folder's permissions; nothing partial was committed."
        ) from e
    except BaseException:
        tx.abort()
        raise
    return final


def _check_tags(doc: Any, where: str) -> None:
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, dict):
            if len(x) == 1:
                (k, v), = x.items()
                if isinstance(k, str) and k.startswith("$"):
                    if k not in _ALLOWED_TAGS:
                        raise CheckpointCorruptError(
                            f"{where}: value.json holds a {k!r} value, which stage results never contain; the "
                            "result is corrupt or hostile"
                        )
                    if k in ("$t", "$np", "$float", "$bytes", "$dtype", "$path") and not isinstance(v, str):
                        raise CheckpointCorruptError(f"{where}: value.json holds a malformed {k!r} value")
                    stack.append(v)
                    continue
            stack.extend(x.values())
