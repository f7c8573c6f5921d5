"""torch.distributed.checkpoint ``StorageWriter`` / ``StorageReader`` for the lightning_ckpt format.

One cohesive thing (hence over 400 lines): the two halves of one DCP adapter, which share the mapping between DCP's
plan items and the files, tensor names and chunk records of the format.

DCP plans who writes which tensor (and, on load, which bytes each rank reads, which is how resharding works);
these classes put the bytes in checksummed safetensors files and describe them in a JSON manifest instead of
DCP's pickled ``.metadata``. Nothing on the read path unpickles.

Call order (see ``torch/distributed/checkpoint/storage.py``): every rank runs ``write_data`` into the store's
transaction (the ``.partial-*`` folder) and fsyncs; DCP gathers every rank's ``WriteResult`` list to the coordinator
(a collective); the coordinator's ``finish`` hands the gathered records to the writer, which commits the transaction
(manifest last). If any rank raises, DCP raises on every rank and nothing is committed. Reading opens each file
through the store's ``open_member`` (a regular file of the size the manifest says, never through a link).
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections import defaultdict
from concurrent.futures import Executor
from typing import Any, Callable

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from ..errors import CheckpointCorruptError, CheckpointError
from ..format import manifest as mf
from ..format.checksum import crc32c
from ..format.tensorfile import (
    FileRecord,
    check_header,
    dtype_from_name,
    dtype_name,
    header_end_from_prefix,
)
from ..store.chunkread import read_to_cuda, read_to_host
from ..store.fs import open_member
from ..store.base import Transaction
from ..store.prefetch import MIN_BYTES as PREFETCH_MIN_BYTES, Prefetcher

SMALL_CHUNK = 1 << 20  # chunks below this are read by one thread, without the prefetcher's per-chunk bookkeeping

# First path segment of a flat key -> file group. Everything else goes to "extra".
GROUPS = {"state_dict": "model", "optimizer_states": "optim"}


def group_of(key: str) -> str:
    i = key.find("/")
    return GROUPS.get(key if i < 0 else key[:i], "extra")


def is_model_or_optim(key: str) -> bool:
    """Model and optimizer tensors: the same on every rank (DDP) or sharded (FSDP), never one rank's own."""
    return group_of(key) in ("model", "optim")


def name_in_file(key: str, offsets: tuple[int, ...], is_shard: bool) -> str:
    """Tensor name inside its safetensors file: the model's own parameter names in the model file."""
    head, _, rest = key.partition("/")
    name = rest if head == "state_dict" and rest and "/" not in rest else key
    if is_shard:
        name += "@" + ",".join(str(o) for o in offsets)
    return name


@dataclasses.dataclass(frozen=True)
class FileResult:
    """Carried to the coordinator inside a WriteResult: one written file's record."""

    rank: int
    record: dict


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    file: Any  # the member: a file name when writing; ("file" | "pack", name) when reading
    name: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class LCStorageWriter(StorageWriter):
    """Writes one rank's tensors (and its non-tensor state bytes) into the transaction ``tx``."""

    def __init__(
        self,
        tx: Transaction,
        *,
        state_bytes: bytes | None,
        on_finish: Callable[[list[FileResult], dict[str, dict]], None],
        crc_executor: Executor | None = None,
        ranks: tuple[int, ...] | None = None,
        extra_states: dict[int, bytes] | None = None,
        pack_keys: set[str] | None = None,
        pack_name: Callable[[int], str] | None = None,
        content_hash: bool = True,
    ) -> None:
        """``ranks``: the global rank of each rank of the process group the save runs on (by default the group is
        the world). ``extra_states``: state files this rank writes for other ranks (their ``state-rankN.json``), used
        when each node's folder must hold every rank's state. ``pack_keys``: tensors written into this rank's pack
        (``pack_name(rank)``), which enters the folder's content store at the commit (deduplicated saves)."""
        super().__init__()
        self.pack_keys = pack_keys or set()
        self.content_hash = content_hash
        self.pack_name = pack_name
        self.tx = tx
        self.state_bytes = state_bytes
        self.ranks = tuple(ranks) if ranks else None
        self.extra_states = dict(extra_states or {})
        self.on_finish = on_finish
        self.crc_executor = crc_executor
        self.rank = 0
        self.is_coordinator = True

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=self.ranks[i] if self.ranks else i) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        files, chunks = self.write_chunks(plan, planner)
        results = [WriteResult(index=MetadataIndex(c[0]), size_in_bytes=c[5], storage_data=c) for c in chunks]
        for fr in files:
            results.append(WriteResult(index=MetadataIndex(f"$file/{fr.record['name']}"), size_in_bytes=fr.record["size"], storage_data=fr))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def write_chunks(self, plan: SavePlan, planner: SavePlanner) -> tuple[list[FileResult], list[tuple]]:
        """Write this rank's part of the plan: its files, and per chunk ``(key, (kind, file), name, offsets, sizes,
        bytes)`` (plain tuples: they travel to the coordinator pickled, far cheaper than DCP's ``WriteResult``)."""
        rank = plan.storage_data if isinstance(plan.storage_data, int) else self.rank
        items = []
        with torch.no_grad():  # a DTensor's to_local() is then its local tensor, not an autograd call per tensor
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise CheckpointError(
                        f"{item.index.fqn!r} is not a tensor; non-tensor state must go through the JSON state file"
                    )
                t = planner.resolve_data(item)
                assert isinstance(t, torch.Tensor)
                chunk = item.tensor_data.chunk
                is_shard = item.type == WriteItemType.SHARD or tuple(chunk.sizes) != tuple(item.tensor_data.size)
                items.append((item.index.fqn, t, tuple(chunk.offsets), tuple(chunk.sizes), is_shard, item.index.fqn))
        files, written = write_rank_files(
            self.tx, rank, items, pack_keys=self.pack_keys, pack_name=self.pack_name, state_bytes=self.state_bytes,
            extra_states=self.extra_states, crc_executor=self.crc_executor, content_hash=self.content_hash)
        return files, [(key, info.file, info.name, info.offsets, info.sizes, n) for key, info, n in written]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        files = [wr.storage_data for rr in results for wr in rr if isinstance(wr.storage_data, FileResult)]
        self.finish_chunks(metadata, [(files, [wr.storage_data for rr in results for wr in rr
                                               if isinstance(wr.storage_data, tuple)])])

    def finish_chunks(self, metadata: Metadata, results: list[tuple[list[FileResult], list[tuple]]]) -> None:
        """The coordinator: every rank's ``write_chunks`` result into the files and the manifest's tensor index."""
        files: list[FileResult] = [fr for rank_files, _ in results for fr in rank_files]
        tensors: dict[str, dict] = {}
        sd_md = metadata.state_dict_metadata
        for _, chunks in results:
            for key, (kind, fname), name, offsets, sizes, _n in chunks:
                entry = tensors.get(key)
                if entry is None:
                    md = sd_md[key]
                    assert isinstance(md, TensorStorageMetadata)
                    entry = tensors[key] = {"dtype": dtype_name(md.properties.dtype), "shape": [int(s) for s in md.size],
                                            "chunks": []}
                entry["chunks"].append({kind: fname, "name": name, "offsets": list(offsets), "sizes": list(sizes)})
        self.on_finish(files, tensors)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def storage_meta(self):
        return None


def write_rank_files(tx: Transaction, rank: int, items: list, *, pack_keys: set[str] | frozenset = frozenset(),
                     pack_name: Callable[[int], str] | None = None, state_bytes: bytes | None = None,
                     extra_states: dict[int, bytes] | None = None, crc_executor: Executor | None = None,
                     content_hash: bool = True) -> tuple[list[FileResult], list[tuple[Any, ChunkInfo, int]]]:
    """Write one rank's tensors into the transaction: one safetensors file per group (model, optimizer, the rest; the
    tensors of ``pack_keys`` into this rank's pack), then the state files, then make them durable. ``items``:
    ``(key, tensor, offsets, sizes, is_shard, tag)``. Returns the files written and, per item, ``(tag, chunk info,
    bytes)``. Used by :class:`LCStorageWriter` (a DCP plan) and by the writer's plain path (``writer/plain.py``)."""
    by_group: dict[str, list] = defaultdict(list)
    for it in items:
        by_group["~pack" if it[0] in pack_keys else group_of(it[0])].append(it)
    written: list[tuple[Any, ChunkInfo, int]] = []
    files: list[FileResult] = []
    for group in sorted(by_group):
        is_pack = group == "~pack"
        fname = pack_name(rank) if is_pack else mf.shard_file_name(group, rank)
        named = [(name_in_file(key, offsets, is_shard), t.detach(), offsets, sizes, tag)
                 for key, t, offsets, sizes, is_shard, tag in by_group[group]]
        rec = tx.write_tensors(fname, [(n, t) for n, t, *_ in named],
                               metadata={"format": "pt", "lightning_ckpt": str(mf.PLAIN_VERSION)},
                               crc_executor=crc_executor, content_hash=content_hash and is_pack)
        by_name = {tr.name: tr for tr in rec.tensors}
        member = ("pack" if is_pack else "file", fname)
        for n, t, offsets, sizes, tag in named:
            tr = by_name[n]
            info = ChunkInfo(member, n, tuple(int(o) for o in offsets), tuple(int(s) for s in sizes))
            written.append((tag, info, tr.end - tr.begin))
        files.append(FileResult(rank, dict(_record_json(rec, rank), **({"pack": True} if is_pack else {}))))
    states = dict(extra_states or {})
    if state_bytes is not None:
        states[rank] = state_bytes
    for r in sorted(states):
        srec = tx.write_bytes(mf.state_file_name(r), states[r])
        files.append(FileResult(r, _record_json(srec, r)))
    if files:
        tx.sync()
    return files, written


def _record_json(rec: FileRecord, rank: int) -> dict:
    d = {"name": rec.name, "size": rec.size, "header_end": rec.header_end, "header_crc32c": rec.header_crc32c, "rank": rank}
    if rec.tensors:
        d["tensors"] = {t.name: t.to_json() for t in rec.tensors}
    return d


class LCStorageReader(StorageReader):
    """Reads tensors of a committed checkpoint, verifying the CRC32C of every region it reads.

    A tensor chunk read whole is read straight into the destination tensor's memory when it is a contiguous CPU
    tensor of the same dtype (no intermediate copy), and its checksum is computed on those bytes.
    """

    def __init__(self, ck: Any, *, verify: bool = True) -> None:
        """``ck``: an opened checkpoint (``read.Opened``): its manifest and where each member can be read."""
        super().__init__()
        self.ck = ck
        self.path = ck.folder
        self.manifest = ck.m
        self.verify = verify
        self.storage_data: dict[MetadataIndex, ChunkInfo] = {}
        self._headers_checked: set = set()
        self._header_lock = threading.Lock()
        self._tls = threading.local()

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        sd_md: dict[str, Any] = {}
        storage: dict[MetadataIndex, ChunkInfo] = {}
        for key, t in self.manifest.get("tensors", {}).items():
            chunks = []
            for c in t["chunks"]:
                offsets, sizes = tuple(int(o) for o in c["offsets"]), tuple(int(s) for s in c["sizes"])
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
                storage[MetadataIndex(key, offsets)] = ChunkInfo(mf.chunk_member(c), c["name"], offsets, sizes)
            sd_md[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype_from_name(t["dtype"])),
                size=torch.Size(int(s) for s in t["shape"]),
                chunks=chunks,
            )
        return Metadata(state_dict_metadata=sd_md, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _check_header(self, f, key: tuple) -> None:
        with self._header_lock:
            if key in self._headers_checked:
                return
        folder, fname, entry = self.ck.where(key)
        where = os.path.join(folder, fname)
        size = entry["size"]  # checked when the file was opened
        f.seek(0)
        head = f.read(entry["header_end"])
        if len(head) != entry["header_end"] or header_end_from_prefix(head, size, where) != entry["header_end"]:
            raise CheckpointCorruptError(f"{where} has a header that does not match the manifest; the file is corrupt")
        if self.verify and crc32c(head) != entry["header_crc32c"]:
            raise CheckpointCorruptError(f"{where}: checksum mismatch in the header; the file is corrupt")
        check_header(head, entry, where)  # even unverified: never read a tensor the file does not describe alike
        with self._header_lock:
            self._headers_checked.add(key)

    #: parallel readers: on NVMe several requests in flight beat one, and page faults of fresh memory overlap I/O
    read_threads = max(2, min(8, os.cpu_count() or 2))

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self.read_chunks([(item, self.storage_data[item.storage_index]) for item in plan.items], planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def read_chunks(self, chunks: list[tuple[Any, ChunkInfo]], planner: Any) -> None:
        """Read ``(item, chunk)`` pairs: ``item.storage_offsets``/``item.lengths`` select the part of the stored chunk
        that ``planner.resolve_tensor(item)`` receives (``planner.commit_tensor(item, tensor)`` follows). DCP's load
        plan gives them; so does ``load.load_tensors`` without DCP (``WholeChunks``)."""
        per_file: dict[str, list] = defaultdict(list)
        for item, info in chunks:
            per_file[info.file].append((item, info))
        self.ck.fetch(sorted(per_file))  # on S3: this rank downloads only the members its plan reads
        # contiguous runs of (file, offset)-sorted items, cut into buckets of about equal bytes, one per thread
        runs = []
        for fname, items in sorted(per_file.items()):
            entry = self.ck.entry(fname)
            items.sort(key=lambda it: entry["tensors"][it[1].name]["begin"])
            for item, info in items:
                t = entry["tensors"][info.name]
                runs.append((fname, item, info, t["end"] - t["begin"]))
        total = sum(r[3] for r in runs)
        # threads for the large chunks' bytes: small chunks cost Python time per chunk, which threads only contend for
        large = sum(r[3] for r in runs if r[3] >= SMALL_CHUNK)
        n_threads = max(1, min(self.read_threads, len(runs), 1 + large // (16 << 20)))
        buckets: list[list] = [[] for _ in range(n_threads)]
        acc, b = 0, 0
        for r in runs:
            if b < n_threads - 1 and acc >= total * (b + 1) / n_threads:
                b += 1
            buckets[b].append(r)
            acc += r[3]
        prefetch, fds = None, []
        try:
            if total >= PREFETCH_MIN_BYTES:  # fault in the host memory the readers fill next, read the files ahead
                for key in sorted(per_file):  # (appended one by one: closed below even if a later open fails)
                    fds.append(open_member(*self.ck.where(key)[:2], self.ck.entry(key)["size"]))
                regions = [[self._host_region(planner, item, info, key) if n >= SMALL_CHUNK else None
                            for key, item, info, n in bk] for bk in buckets]  # (small ones: faulted in as read)
                prefetch = Prefetcher(fds, regions, total)
            if n_threads == 1:
                self._read_bucket(0, buckets[0], planner, prefetch)
            else:
                import concurrent.futures as cf

                with cf.ThreadPoolExecutor(n_threads, thread_name_prefix="lightning_ckpt-read") as ex:
                    futs = [ex.submit(self._read_bucket, i, bk, planner, prefetch) for i, bk in enumerate(buckets)]
                    for fut in futs:
                        fut.result()
        finally:
            if prefetch is not None:
                prefetch.close()
            for fd in fds:
                os.close(fd)

    def _host_region(self, planner: LoadPlanner, item: Any, info: ChunkInfo, key: Any) -> tuple[int, int] | None:
        """The host memory a chunk is read straight into (address, bytes), or None (a GPU, or through a copy)."""
        target = planner.resolve_tensor(item)
        t = self.ck.entry(key)["tensors"][info.name]
        if target.device.type != "cpu" or not self._direct(item, info, target, t):
            return None
        return target.data_ptr(), t["end"] - t["begin"]

    @staticmethod
    def _direct(item: Any, info: ChunkInfo, target: torch.Tensor, t: dict) -> bool:
        """The whole chunk goes into a destination laid out exactly like it: read straight into its memory."""
        return (all(o == 0 for o in item.storage_offsets) and tuple(item.lengths) == info.sizes
                and target.is_contiguous() and target.dtype == dtype_from_name(t["dtype"])
                and tuple(target.shape) == info.sizes)

    def _read_bucket(self, index: int, bucket: list, planner: LoadPlanner, prefetch: Any) -> None:
        handles: dict[str, Any] = {}
        cache: dict[str, torch.Tensor] = {}
        try:
            for i, (key, item, info, n) in enumerate(bucket):
                f = handles.get(key)
                if f is None:
                    folder, fname, entry = self.ck.where(key)
                    where = os.path.join(folder, fname)
                    f = os.fdopen(open_member(folder, fname, entry["size"]), "rb", buffering=0)
                    handles[key] = f
                    self._check_header(f, key)
                    last = key
                elif key != last:
                    folder, fname, entry = self.ck.where(key)
                    where, last = os.path.join(folder, fname), key
                gate = None
                if prefetch is not None and n >= SMALL_CHUNK:
                    gate = lambda upto, i=i: prefetch.wait(index, i, upto)  # noqa: E731
                self._read_item(f, where, entry, item, info, planner, cache, gate)
        finally:
            for f in handles.values():
                f.close()

    def _read_chunk(self, f, where: str, t: dict, into: torch.Tensor | None, gate: Any = None) -> torch.Tensor:
        buf = into if into is not None else torch.empty([int(s) for s in t["shape"]], dtype=dtype_from_name(t["dtype"]))
        read_to_host(f, where, t, buf, self.verify, gate)
        return buf

    def _read_item(self, f, where, entry, item, info: ChunkInfo, planner: LoadPlanner, cache, gate: Any = None) -> None:
        t = dict(entry["tensors"][info.name], _name=info.name)
        if tuple(int(s) for s in t["shape"]) != info.sizes:
            raise CheckpointCorruptError(f"{where}: tensor {info.name!r} has a shape that does not match the manifest index")
        target = planner.resolve_tensor(item).detach()
        direct = self._direct(item, info, target, t)
        if direct and target.device.type == "cuda":
            read_to_cuda(f, where, t, target, self.verify, self._tls)
        elif direct and target.device.type == "cpu":
            self._read_chunk(f, where, t, target, gate)
        else:
            src = cache.get((info.file, info.name))
            if src is None:
                src = self._read_chunk(f, where, t, None)
                cache[(info.file, info.name)] = src
            for dim, (off, ln) in enumerate(zip(item.storage_offsets, item.lengths)):
                src = src.narrow(dim, off, ln)
            if tuple(target.shape) != tuple(src.shape):
                raise CheckpointCorruptError(f"{where}: tensor {info.name!r} does not fit its destination")
            target.copy_(src)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True


def unwrap_dcp_error(e: BaseException) -> BaseException:
    """DCP wraps every rank's error in a ``CheckpointException``; return the first underlying one."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        first = e.failures[min(e.failures)]
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return e
