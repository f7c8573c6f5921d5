"""Consolidate a (possibly sharded, multi-rank) checkpoint into one plain ``model.safetensors``.

Streaming: the output header is computed from the manifest's tensor index, then each tensor is assembled from its
chunks (read straight into place, checksums verified on the way in), converted to ``dtype`` if asked, written, and
released; a reader thread prepares the next tensor (of 1 MiB or more) while one is written, and smaller ones are
read when their turn comes. Peak memory is about two of the largest tensors, not the model. Above ``max_shard_bytes`` the output is split into
``model-00001-of-0000N.safetensors`` files with a ``model.safetensors.index.json`` (the Hugging Face layout).
Checksums of the output (CRC32C of the header and of every tensor) go to ``<out>.checksums.json``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import CheckpointCorruptError, CheckpointError
from ..format.checksum import content_hash, crc32c
from ..format.codec import split_key
from ..format.tensorfile import (byte_view, check_header, content_mismatch, dtype_from_name, dtype_name, header_bytes,
                                 readinto_exact)
from ..format.manifest import chunk_member
from ..read import Opened, check_sizes, open_checkpoint
from ..store import LocalStore
from ..store.fs import OPS, check_output_path, open_member

_WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def clean_name(name: str) -> str:
    """Strip wrapper artefacts (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``, FSDP wrappers) from a name."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
        for p in ("._fsdp_wrapped_module.", "._checkpoint_wrapped_module.", "._orig_mod."):
            if p in name:
                name, changed = name.replace(p, "."), True
    return name


def parse_dtype(dtype: Optional[object]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    d = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if d is None:
        raise ValueError(f"dtype={dtype!r} is invalid; use one of {sorted(_DTYPES)} or None to keep each tensor's dtype")
    return d


def parse_size(value: object) -> Optional[int]:
    """'5GB', '500MB', 1000 -> bytes."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_shard_bytes={value!r} is invalid; it must be positive")
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?B?)\s*", str(value).upper())
    if not m:
        raise ValueError(f"size {value!r} is invalid; write it like 5GB, 500MB or a number of bytes")
    mult = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}[m.group(2)]
    return int(float(m.group(1)) * mult)


@dataclass
class MergeResult:
    files: list[str]
    index_path: Optional[str]
    checksums_path: str
    tensors: int
    bytes: int
    seconds: float
    peak_buffer_bytes: int


def _plan(m: dict, dtype: Optional[torch.dtype]) -> list[tuple[str, str, torch.dtype, list[int]]]:
    out = []
    seen: dict[str, str] = {}
    for key, t in m.get("tensors", {}).items():
        parts = split_key(key)
        if parts[0] != "state_dict" or len(parts) != 2:
            continue
        name = clean_name(parts[1])
        if name in seen:
            raise CheckpointError(f"two tensors map to the merged name {name!r} ({seen[name]!r} and {key!r})")
        seen[name] = key
        src_dtype = dtype_from_name(t["dtype"])
        out_dtype = dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype
        out.append((name, key, out_dtype, [int(s) for s in t["shape"]]))
    return out


def output_path(out: object) -> str:
    """Where a merge writes: ``out`` itself, or ``out/model.safetensors`` when ``out`` is a folder (an existing one, or
    a path written with a trailing slash)."""
    p = os.fspath(out)  # type: ignore[arg-type]
    if not p:
        raise ValueError("the output path is empty; give a file such as export/model.safetensors or a folder")
    if p.endswith(os.sep) or os.path.isdir(p):
        p = os.path.join(p, "model.safetensors")
    return check_output_path(p, "the merged weights")


def merge_checkpoint(
    path: str,
    out_path: str,
    dtype: Optional[object] = None,
    *,
    max_shard_bytes: Optional[object] = None,
    verify: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> MergeResult:
    """Write the model weights of the checkpoint at ``path`` as one safetensors file (or a sharded set).

    Args:
        path: checkpoint folder (any world size, any mode).
        out_path: output file (``.../model.safetensors``), or a folder to write ``model.safetensors`` into; with
            sharding, its folder receives the shards and ``model.safetensors.index.json``.
        dtype: convert floating-point tensors (``"bf16"``, ``torch.float16``, ...); ``None`` keeps them.
        max_shard_bytes: split the output above this size (``"5GB"``); ``None`` writes one file.
        verify: check the CRC32C of every chunk read.
        progress: called with (bytes done, bytes total).
    """
    t0 = time.perf_counter()
    out_path = output_path(out_path)  # a bad output path is refused before anything is read
    dtype = parse_dtype(dtype)
    limit = parse_size(max_shard_bytes)
    ck = open_checkpoint(path)
    m = ck.m
    plan = _plan(m, dtype)
    members = sorted({chunk_member(c) for _, key, _, _ in plan for c in m["tensors"][key]["chunks"]})
    ck.fetch(members)  # on S3: into the local read cache; every byte is verified as it is merged
    check_sizes(ck, members)
    if not plan:
        raise CheckpointError(f"{path} holds no model weights (kind {m.get('kind')!r}); nothing to merge")
    nbytes = [torch.empty((), dtype=d).element_size() * _numel(shape) for _, _, d, shape in plan]
    total = sum(nbytes)
    # group into output shards in the model's order
    shards: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(nbytes):
        if limit is not None and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    out_path = output_path(out_path)
    out_dir = os.path.dirname(out_path)
    out = LocalStore(out_dir)
    if len(shards) == 1:
        names = [out_path]
    else:
        stem = os.path.basename(out_path).removesuffix(".safetensors")
        names = [os.path.join(out_dir, f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors") for i in range(len(shards))]
    done = 0
    peak = 0
    checksums: dict = {"algorithm": "crc32c", "files": {}}
    readers: dict[str, object] = {}
    try:
        for fname, idxs in zip(names, shards):
            header, offsets = header_bytes([(plan[i][0], plan[i][2], plan[i][3], nbytes[i]) for i in idxs], {"format": "pt"})
            tensor_sums = {}
            with out.replacing(os.path.basename(fname)) as tmp:  # the output appears whole or not at all
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    OPS.write_all(fd, header)
                    # two stages: a reader thread assembles (and verifies) tensor i+1 while this thread writes tensor i;
                    # a small tensor is assembled here when its turn comes (handing it to the thread and back costs
                    # more than reading it: at 20,000 small tensors, most of the merge's time)
                    def ahead(j: int) -> Optional[cf.Future]:
                        if j >= len(idxs) or nbytes[idxs[j]] < _AHEAD_FROM:
                            return None
                        return ex.submit(_assemble, ck, plan[idxs[j]][1], readers, verify)

                    with cf.ThreadPoolExecutor(1, thread_name_prefix="lightning_ckpt-merge") as ex:
                        nxt = ahead(0)
                        for j, (i, (b, e)) in enumerate(zip(idxs, offsets)):
                            name, key, out_dtype, shape = plan[i]
                            t, src_crc, mv = nxt.result() if nxt is not None else _assemble(ck, key, readers, verify)
                            nxt = ahead(j + 1)
                            # held at once: this tensor (and its converted copy) plus the next one being read
                            peak = max(peak, t.numel() * t.element_size() * (2 if t.dtype != out_dtype else 1)
                                       + (nbytes[idxs[j + 1]] if j + 1 < len(idxs) else 0))
                            if t.dtype != out_dtype:
                                t, src_crc = t.to(out_dtype), None
                                mv = byte_view(t)
                            OPS.write_all(fd, mv)
                            crc = src_crc if (src_crc is not None and verify) else crc32c(mv)
                            tensor_sums[name] = {"begin": len(header) + b, "end": len(header) + e, "crc32c": crc}
                            done += nbytes[i]
                            del t, mv
                            if progress is not None:
                                progress(done, total)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            checksums["files"][os.path.basename(fname)] = {
                "size": os.path.getsize(fname), "header_end": len(header), "header_crc32c": crc32c(header), "tensors": tensor_sums,
            }
    finally:
        for f in readers.values():
            f.close()  # type: ignore[attr-defined]
    index_path = None
    if len(names) > 1:
        index_path = os.path.join(out_dir, os.path.basename(out_path).removesuffix(".safetensors") + ".safetensors.index.json")
        weight_map = {plan[i][0]: os.path.basename(fname) for fname, idxs in zip(names, shards) for i in idxs}
        out.write_atomic(os.path.basename(index_path),
                         json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1).encode())
    checksums["source"] = {"path": ck.store.path(ck.name), "step": m.get("step"), "name": m.get("name")}
    checksums_path = out_path + ".checksums.json"
    # compact: with indent, json takes its pure-Python encoder (about 0.5 s at 20,000 tensors)
    out.write_atomic(os.path.basename(checksums_path), json.dumps(checksums, separators=(",", ":")).encode())
    return MergeResult(names, index_path, checksums_path, len(plan), total, time.perf_counter() - t0, peak)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_AHEAD_FROM = 1 << 20  # tensors of this many bytes or more are read ahead by the merge's reader thread


def _assemble(ck: Opened, key: str, readers: dict, verify: bool) -> tuple[torch.Tensor, Optional[int], memoryview]:
    """The full tensor ``key`` from its chunks, each read straight into its place when contiguous there.
    Also returns the CRC32C of its bytes when it is one chunk (then the verified source checksum is the output's),
    and a byte view of the tensor."""
    t = ck.m["tensors"][key]
    dtype = dtype_from_name(t["dtype"])
    shape = [int(s) for s in t["shape"]]
    out = torch.empty(shape, dtype=dtype)
    covered = 0
    for c in t["chunks"]:
        folder, fname, entry = ck.where(chunk_member(c))
        rec = entry["tensors"][c["name"]]
        where = os.path.join(folder, fname)
        f = readers.get(chunk_member(c))
        if f is None:
            f = os.fdopen(open_member(folder, fname, entry["size"]), "rb", buffering=0)
            readers[chunk_member(c)] = f
            head = f.read(entry["header_end"])
            if verify and crc32c(head) != entry["header_crc32c"]:
                raise CheckpointCorruptError(f"{where}: checksum mismatch in the header; the file is corrupt")
            check_header(head, entry, where)
        offsets, sizes = [int(o) for o in c["offsets"]], [int(s) for s in c["sizes"]]
        dst = out
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            dst = dst.narrow(dim, o, s)
        n = rec["end"] - rec["begin"]
        if dst.numel() * dst.element_size() != n:
            raise CheckpointCorruptError(f"{where}: chunk {c['name']!r} does not match its shape and dtype")
        buf = dst if dst.is_contiguous() else torch.empty(sizes, dtype=dtype)
        mv = byte_view(buf)
        f.seek(rec["begin"])
        readinto_exact(f, mv, where)
        if verify and crc32c(mv) != rec["crc32c"]:
            raise CheckpointCorruptError(f"{where}: checksum mismatch in tensor {c['name']!r}; the checkpoint is corrupt")
        if verify and rec.get("xxh128") is not None and content_hash(mv) != rec["xxh128"]:
            raise content_mismatch(where, c["name"])  # (a packed tensor: its recorded content hash is checked too)
        if buf is not dst:
            dst.copy_(buf)
        covered += _numel(sizes)
    if covered != _numel(shape):
        raise CheckpointCorruptError(f"{ck.folder}: the chunks of {key!r} cover {covered} of {_numel(shape)} elements")
    single = t["chunks"][0] if len(t["chunks"]) == 1 else None
    crc = ck.entry(chunk_member(single))["tensors"][single["name"]]["crc32c"] if single is not None else None
    return out, crc, (mv if single is not None and buf is dst else byte_view(out))


def verify_merged(out_path: str) -> None:
    """Check a merged file (or set) against its ``.checksums.json``."""
    with open(os.fspath(out_path) + ".checksums.json") as f:
        sums = json.load(f)
    folder = os.path.dirname(os.path.abspath(out_path))
    for fname, entry in sums["files"].items():
        p = os.path.join(folder, fname)
        with open(p, "rb") as f:
            data = f.read()
        if len(data) != entry["size"] or crc32c(data[: entry["header_end"]]) != entry["header_crc32c"]:
            raise CheckpointCorruptError(f"{p} does not match its checksums")
        for name, t in entry["tensors"].items():
            if crc32c(data[t["begin"] : t["end"]]) != t["crc32c"]:
                raise CheckpointCorruptError(f"{p}: tensor {name!r} does not match its checksum")


__all__ = ["MergeResult", "clean_name", "merge_checkpoint", "verify_merged", "dtype_name"]
