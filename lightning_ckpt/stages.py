"""Checkpointed data-preprocessing stages: compute a stage once, load it afterwards, resume a crashed pipeline.

::

    from lightning_ckpt.stages import StageCache

    cache = StageCache("cache/")

    @cache.stage(version="1")
    def tokenize(texts: list[str], vocab_size: int = 100) -> torch.Tensor: ...

    @cache.stage()
    def split(ids: torch.Tensor, frac: float = 0.8) -> dict: ...

    ids = tokenize(texts, vocab_size=50)   # computed once, then loaded from cache/
    parts = split(ids)                     # keyed by the content of ids: a change upstream reaches it

Each call is keyed by a **fingerprint**: SHA-256 of the stage's name, its code (the function's syntax tree without
decorators, comments or formatting; the code object when the source is unavailable), the ``version`` string you bump
by hand, and the call's arguments after defaults are applied (plain values as canonical JSON; tensors and numpy arrays
by dtype, shape and CRC32C of their bytes). The output of a stage is an argument of the next one, so a change to one
stage recomputes it and every later stage whose input it changes, and nothing else. The CRC32C of a stage's output
tensors is known from writing or verifying them, so passing an output to the next stage costs no hashing (until the
tensor is modified in place; then it is hashed again).

Each result is a folder ``<dir>/<stage name>/<fingerprint>/`` written like a checkpoint: ``output.safetensors``
(every tensor and numpy array), ``value.json`` (the structure around them, no pickle) and ``manifest.json`` written
last with the sizes and CRC32C of every byte, in a ``.partial-*`` folder renamed into place. A process killed at any
moment leaves committed results and at most an uncommitted partial folder, removed by the next ``StageCache`` on that
host. Loading checks every byte; a corrupt or unreadable result is reported with a :class:`StageCacheWarning`, removed
and recomputed. Nothing read from the cache is unpickled or imported. ``lightning_ckpt.verify_checkpoint`` accepts a
result folder too.

Not part of the fingerprint: code that the stage calls (helpers, libraries) and global state. Bump ``version`` when
they change in a way that matters, or call ``cache.clear(stage)``. A remembered checksum is dropped when the tensor is
changed in place through torch, not when its memory is written through a numpy view (``t.numpy()[0] = 1``); clone a
stage output before changing it that way. Results load on the CPU, without autograd history. Decorate plain functions,
not methods.
"""
from __future__ import annotations

import ast
import enum
import functools
import hashlib
import inspect
import json
import logging
import marshal
import math
import os
import pathlib
import re
import socket
import textwrap
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar, overload

import numpy as np
import torch

from .checkpoints import read_state_doc
from .errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError
from .format import manifest as mf
from .format.checksum import crc32c
from .format.codec import decode, encode
from .format.tensorfile import (
    byte_view,
    dtype_from_name,
    header_end_from_prefix,
    readinto_exact,
    write_bytes_file,
    write_tensor_file,
)
from .storage.local import fsync_dir, remove_tree

__all__ = [
    "Stage",
    "StageCache",
    "StageCacheWarning",
    "StageEntry",
    "StageEvent",
    "UncacheableValueError",
    "checkpointed_stage",
]

log = logging.getLogger("lightning_ckpt")

F = TypeVar("F", bound=Callable[..., Any])

KIND = "stage"
STAGE_FORMAT_VERSION = 1
TENSOR_FILE = "output.safetensors"
VALUE_FILE = "value.json"
_KEY_PREFIX = "v"  # tensor names in output.safetensors: "v" (the output itself) or "v/<path>"
_FP_RE = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+@,-]")
# tags of lightning_ckpt.format.codec that a stage result may contain; anything else in value.json is refused
_ALLOWED_TAGS = {"$t", "$np", "$tuple", "$dict", "$float", "$set", "$bytes", "$npscalar", "$size", "$dtype", "$path"}


class StageCacheWarning(UserWarning):
    """A cached stage result was corrupt, unreadable or from a newer release; it is recomputed."""


class UncacheableValueError(CheckpointError, TypeError):
    """A stage argument cannot be fingerprinted, or a stage output cannot be stored without pickle."""


@dataclass(frozen=True)
class StageEvent:
    """What one stage call did: ``status`` is ``"computed"``, ``"loaded"`` or ``"recomputed"`` (the cached result
    was corrupt). ``seconds`` is the wall time of the call, fingerprinting included."""

    stage: str
    fingerprint: str
    status: str
    seconds: float
    path: str


@dataclass(frozen=True)
class StageEntry:
    """A committed result in the cache (read from its manifest, not verified)."""

    stage: str
    fingerprint: str
    path: str
    version: str
    size_bytes: int
    created_unix: float | None
    compute_s: float | None


# ------------------------------------------------------------------ fingerprints
# CRC32C of the bytes of tensors this process wrote or verified as stage outputs, keyed by id() and guarded by a weak
# reference and the tensor's version counter (bumped by in-place operations), so chaining stages costs no hashing.
_known_crcs: dict[int, tuple[weakref.ref, int, int]] = {}


def _version_of(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # inference-mode tensors have no version counter
        return None


def _remember_crc(t: torch.Tensor, crc: int) -> None:
    key, version = id(t), _version_of(t)
    if version is None:
        return
    try:
        ref = weakref.ref(t, lambda _r, key=key: _known_crcs.pop(key, None))
    except TypeError:  # pragma: no cover - tensors support weak references
        return
    _known_crcs[key] = (ref, version, crc)


def _tensor_crc(t: torch.Tensor) -> int:
    hit = _known_crcs.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == _version_of(t):
        return hit[2]
    return crc32c(byte_view(_plain(t)))


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A dense contiguous CPU tensor without autograd history, holding the same values."""
    t = t.detach()
    if t.layout != torch.strided:
        raise UncacheableValueError(f"a {t.layout} tensor cannot be cached; convert it with .to_dense()")
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def _code_identity(fn: Callable) -> str:
    """A text that changes when the function's code changes, but not with comments, formatting or decorators."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if code is None:
            raise UncacheableValueError(
                f"cannot read the code of {fn!r} to fingerprint it; decorate a plain Python function"
            ) from None
        return "code:" + hashlib.sha256(marshal.dumps(code)).hexdigest()
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return "source:" + src
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == fn.__name__:
            node.decorator_list = []
            return "ast:" + ast.dump(node)
    return "source:" + src


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _value_digest(value: Any, what: str) -> Any:
    """A JSON-able description of ``value`` that is equal for equal content: the codec document with every tensor
    replaced by its dtype, shape and CRC32C."""

    def unsupported(key: str, x: Any) -> None:
        raise UncacheableValueError(
            f"{what}{'/' + key if key else ''} is a {type(x).__module__}.{type(x).__qualname__}, which cannot be "
            "fingerprinted by content. Pass plain values (numbers, strings, lists, dicts), tensors or numpy arrays, "
            "or name the parameter in ignore=(...) and bump version= yourself when it changes."
        )

    _check_no_objects(value, what)
    doc, tensors = encode(value, on_unsupported=unsupported)
    return {
        "doc": doc,
        "tensors": {k: [str(t.dtype), list(t.shape), _tensor_crc(t)] for k, t in sorted(tensors.items())},
    }


def _check_no_objects(value: Any, what: str, _depth: int = 0) -> None:
    """Refuse values the codec would store lossily (enums, classes, namedtuples, object arrays, arbitrary objects)."""
    if _depth > 200:
        raise UncacheableValueError(f"{what} is nested more than 200 levels deep")
    if value is None or isinstance(value, (bool, int, str, bytes, torch.Tensor, torch.dtype, np.generic, pathlib.Path)):
        if isinstance(value, enum.Enum) or (isinstance(value, np.generic) and value.dtype.kind not in "biuf"):
            raise UncacheableValueError(f"{what} is a {type(value).__qualname__}, which would not load back as itself")
        return
    if isinstance(value, float):
        return
    if isinstance(value, np.ndarray):
        if not (value.dtype.kind in "biuf" or value.dtype == np.bool_):
            raise UncacheableValueError(
                f"{what} is a numpy array of dtype {value.dtype}; only numeric and boolean arrays can be cached"
            )
        return
    if type(value) in (list, tuple, set, torch.Size):
        for i, v in enumerate(value):
            _check_no_objects(v, f"{what}[{i}]", _depth + 1)
        return
    if type(value) is dict:
        for k, v in value.items():
            _check_no_objects(k, f"{what} key {k!r}", _depth + 1)
            _check_no_objects(v, f"{what}[{k!r}]", _depth + 1)
        return
    raise UncacheableValueError(
        f"{what} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be stored or fingerprinted "
        "without pickle. Use tensors, numpy arrays, numbers, strings, bytes and lists/tuples/dicts/sets of them "
        "(a stage argument may also be named in ignore=(...))."
    )


def _safe_name(name: str) -> str:
    s = _UNSAFE.sub("_", name).strip(".") or "stage"
    return s[:120]


# ------------------------------------------------------------------ the cache
class StageCache:
    """A folder of cached stage results.

    Args:
        directory: where results live (created if missing). May be shared by several processes and machines;
            concurrent computations of the same result commit once, the others are discarded.
        fsync: make each result durable before it is committed (turn off only for throwaway caches).
        verify: check every byte of a cached result against its CRC32C when it is loaded (default). With
            ``verify=False`` only sizes and structure are checked.
    """

    def __init__(self, directory: str | os.PathLike, *, fsync: bool = True, verify: bool = True) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.fsync = fsync
        self.verify = verify
        self.history: list[StageEvent] = []
        """Every stage call of this process on this cache, in order."""
        os.makedirs(self.directory, exist_ok=True)
        self._host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
        self.cleanup_partials()

    # -------------------------------------------------------------- decorator
    @overload
    def stage(self, fn: F, /) -> "Stage": ...

    @overload
    def stage(
        self, fn: None = None, /, *, name: str | None = None, version: str = "0", ignore: Iterable[str] = ()
    ) -> Callable[[F], "Stage"]: ...

    def stage(self, fn=None, /, *, name=None, version="0", ignore=()):
        """Decorate a function as a cached stage (``@cache.stage`` or ``@cache.stage(version="2")``).

        Args:
            name: the stage's name in the cache and in its fingerprint (default: the function's ``__name__``).
            version: any string; change it to recompute when something outside the function's own code changed.
            ignore: parameter names left out of the fingerprint (say, ``num_workers`` or a logger).
        """

        def wrap(f: F) -> Stage:
            return Stage(self, f, name=name, version=version, ignore=ignore)

        return wrap(fn) if fn is not None else wrap

    # -------------------------------------------------------------- listing and cleanup
    def entries(self, stage: str | None = None) -> list[StageEntry]:
        """Committed results (oldest first), of one stage or of all. Unreadable folders are skipped."""
        out = []
        names = [_safe_name(stage)] if stage is not None else sorted(os.listdir(self.directory))
        for sname in names:
            sdir = os.path.join(self.directory, sname)
            if sname.startswith(".") or not os.path.isdir(sdir):
                continue
            for fp in os.listdir(sdir):
                if not _FP_RE.match(fp):
                    continue
                path = os.path.join(sdir, fp)
                try:
                    m = mf.read_manifest(path)
                except CheckpointError:
                    continue
                info = m.get("stage") if isinstance(m.get("stage"), dict) else {}
                out.append(
                    StageEntry(
                        stage=str(info.get("name", sname)),
                        fingerprint=fp,
                        path=path,
                        version=str(info.get("version", "")),
                        size_bytes=sum(int(f["size"]) for f in m["files"].values()),
                        created_unix=m.get("created_unix"),
                        compute_s=info.get("compute_s"),
                    )
                )
        out.sort(key=lambda e: (e.created_unix or 0.0, e.path))
        return out

    def clear(self, stage: str | None = None) -> int:
        """Delete the results of one stage (by name), or of every stage. Returns how many results were deleted."""
        n = 0
        for e in self.entries(stage):
            self._discard(e.path)
            n += 1
        return n

    def cleanup_partials(self) -> list[str]:
        """Remove partial folders left by processes on this host that died while writing. Returns what was removed.

        Partial folders of live processes, and of other hosts sharing the folder, are left alone."""
        removed = []
        for sname in os.listdir(self.directory):
            sdir = os.path.join(self.directory, sname)
            if sname.startswith(".") or not os.path.isdir(sdir):
                continue
            for e in os.listdir(sdir):
                if not (e.startswith(mf.PARTIAL_PREFIX) or e.startswith(mf.TRASH_PREFIX)):
                    continue
                parts = e.split("-")  # .partial-<fp16>-<host>-<pid>-<rand>
                if len(parts) >= 5 and parts[-3] == self._host and parts[-2].isdigit() and _pid_alive(int(parts[-2])):
                    continue
                if len(parts) >= 5 and parts[-3] != self._host:
                    continue
                remove_tree(os.path.join(sdir, e))
                removed.append(os.path.join(sdir, e))
        if removed:
            log.warning("lightning_ckpt: removed %d interrupted stage result(s) in %s", len(removed), self.directory)
        return removed

    # -------------------------------------------------------------- internals
    def _entry_path(self, stage_name: str, fp: str) -> str:
        return os.path.join(self.directory, _safe_name(stage_name), fp)

    def _discard(self, path: str) -> None:
        parent, base = os.path.split(path)
        trash = os.path.join(parent, f"{mf.TRASH_PREFIX}{base[:16]}-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        except OSError:
            trash = path
        remove_tree(trash)

    def _load(self, path: str, fp: str) -> Any:
        """Read a committed result, checking every byte. Raises a CheckpointError subclass on anything wrong."""
        m = mf.read_manifest(path)
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
        tensors = self._read_tensors(path, m) if TENSOR_FILE in m["files"] else {}
        doc = read_state_doc(path, m)  # size, CRC32C and JSON checked
        _check_tags(doc, path)

        def get(key: str) -> torch.Tensor:
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointCorruptError(f"{path}: value.json refers to tensor {key!r}, which the file lacks")
            return tensors[key]

        return decode(doc, get)

    def _read_tensors(self, path: str, m: dict) -> dict[str, torch.Tensor]:
        entry = m["files"][TENSOR_FILE]
        fpath = os.path.join(path, TENSOR_FILE)
        out: dict[str, torch.Tensor] = {}
        try:
            f = open(fpath, "rb", buffering=0)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{fpath} is missing; the cached result is incomplete") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["size"]:
                raise CheckpointCorruptError(f"{fpath} has {size} bytes where the manifest says {entry['size']}")
            head_end = header_end_from_prefix(f.read(8), size, fpath)
            if head_end != entry["header_end"]:
                raise CheckpointCorruptError(f"{fpath} has a header that does not match the manifest")
            f.seek(0)
            head = bytearray(head_end)
            readinto_exact(f, memoryview(head), fpath)
            if self.verify and crc32c(head) != entry["header_crc32c"]:
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
                if self.verify:  # unverified bytes get no remembered checksum: the next stage hashes them
                    crc = crc32c(view)
                    if crc != rec["crc32c"]:
                        raise CheckpointCorruptError(
                            f"{fpath}: checksum mismatch in tensor {name!r} (bytes [{begin}, {end})); the file is corrupt"
                        )
                    _remember_crc(t, crc)
                out[name] = t
        return out

    def _write(self, stage: "Stage", fp: str, value: Any, key_summary: dict, compute_s: float) -> str:
        """Commit ``value`` as the result of ``fp``; returns the committed folder (another process's if it won)."""
        final = self._entry_path(stage.name, fp)
        sdir = os.path.dirname(final)
        os.makedirs(sdir, exist_ok=True)
        _check_no_objects(value, f"the output of stage {stage.name!r}")
        doc, tensors = encode(value, key_fn=lambda k: f"{_KEY_PREFIX}/{k}" if k else _KEY_PREFIX)
        plain = [(k, _plain(t)) for k, t in tensors.items()]
        partial = os.path.join(sdir, f"{mf.PARTIAL_PREFIX}{fp[:16]}-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        try:
            os.makedirs(partial)
            files = {}
            if plain:
                rec = write_tensor_file(os.path.join(partial, TENSOR_FILE), plain, fsync=self.fsync)
                files[TENSOR_FILE] = {
                    "size": rec.size,
                    "header_end": rec.header_end,
                    "header_crc32c": rec.header_crc32c,
                    "tensors": {t.name: t.to_json() for t in rec.tensors},
                }
                for (_, t), tr in zip(tensors.items(), rec.tensors):
                    if isinstance(t, torch.Tensor):
                        _remember_crc(t, tr.crc32c)
            vrec = write_bytes_file(os.path.join(partial, VALUE_FILE), _canonical(doc), fsync=self.fsync)
            files[VALUE_FILE] = {"size": vrec.size, "header_end": vrec.header_end, "header_crc32c": vrec.header_crc32c}
            m = {
                "format": mf.FORMAT_NAME,
                "format_version": mf.FORMAT_VERSION,
                "kind": KIND,
                "name": fp,
                "step": 0,
                "epoch": None,
                "tags": [KIND],
                "created_unix": time.time(),
                "stage": {
                    "format_version": STAGE_FORMAT_VERSION,
                    "name": stage.name,
                    "fingerprint": fp,
                    "version": stage.version,
                    "compute_s": round(compute_s, 6),
                    "key": key_summary,
                },
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
            mf.validate_manifest(json.loads(raw), "the stage manifest being written")
            write_bytes_file(os.path.join(partial, mf.MANIFEST), raw, fsync=self.fsync)  # written last
            if self.fsync:
                fsync_dir(partial)
            _before_commit(partial)
            try:
                os.rename(partial, final)  # the commit point
            except OSError:
                if os.path.isfile(os.path.join(final, mf.MANIFEST)):  # another process committed it first
                    remove_tree(partial)
                    return final
                raise
            if self.fsync:
                fsync_dir(sdir)
        except CheckpointError:
            remove_tree(partial)
            raise
        except OSError as e:
            remove_tree(partial)
            raise CheckpointWriteError(
                f"could not cache the result of stage {stage.name!r} in {sdir}: {e}. Free disk space or fix the "
                "folder's permissions; nothing partial was committed."
            ) from e
        except BaseException:
            remove_tree(partial)
            raise
        return final


def _before_commit(partial: str) -> None:
    """Called with the complete partial folder just before it is renamed into place (a hook for crash tests)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


# ------------------------------------------------------------------ one stage
class Stage:
    """A function whose results are cached in a :class:`StageCache`; call it like the function.

    Attributes:
        name: the stage's name (folder name in the cache, part of the fingerprint).
        version: the user-chosen version string.
        last_event: what the latest call did (a :class:`StageEvent`), or ``None`` before the first call.
    """

    def __init__(self, cache: StageCache, fn: Callable, *, name: str | None, version: str, ignore: Iterable[str]) -> None:
        if not callable(fn):
            raise TypeError(f"@stage decorates a function, got {fn!r}")
        self.cache = cache
        self.fn = fn
        self.name = str(name or getattr(fn, "__name__", None) or type(fn).__name__)
        self.version = str(version)
        self.ignore = frozenset(ignore)
        self.signature = inspect.signature(fn)
        unknown = self.ignore - set(self.signature.parameters)
        if unknown:
            raise ValueError(f"ignore={sorted(unknown)} names no parameter of {self.name}{self.signature}")
        self._code = _code_identity(fn)
        self.last_event: StageEvent | None = None
        functools.update_wrapper(self, fn)

    def fingerprint(self, *args: Any, **kwargs: Any) -> str:
        """The 64-hex-digit key of a call with these arguments (nothing is computed or loaded)."""
        return self._key(args, kwargs)[0]

    def path(self, *args: Any, **kwargs: Any) -> str:
        """The folder where the result of a call with these arguments is (or would be) cached."""
        return self.cache._entry_path(self.name, self.fingerprint(*args, **kwargs))

    def _key(self, args: tuple, kwargs: dict) -> tuple[str, dict]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"stage {self.name}: {e}") from None
        bound.apply_defaults()
        params = {k: v for k, v in bound.arguments.items() if k not in self.ignore}
        digest = {k: _value_digest(v, f"argument {k!r} of stage {self.name!r}") for k, v in params.items()}
        doc = {
            "lightning_ckpt_stage": STAGE_FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "code": hashlib.sha256(self._code.encode()).hexdigest(),
            "args": digest,
        }
        fp = hashlib.sha256(_canonical(doc)).hexdigest()
        summary = {"code_sha256": doc["code"], "args_sha256": {k: hashlib.sha256(_canonical(v)).hexdigest()[:16] for k, v in digest.items()}}
        return fp, summary

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        fp, summary = self._key(args, kwargs)
        path = self.cache._entry_path(self.name, fp)
        status = "computed"
        if os.path.lexists(path):
            try:
                value = self.cache._load(path, fp)
            except CheckpointError as e:
                warnings.warn(
                    f"lightning_ckpt: the cached result of stage {self.name!r} at {path} is unusable ({e}); it is "
                    "deleted and recomputed.",
                    StageCacheWarning,
                    stacklevel=2,
                )
                log.warning("stage %s: cached result %s unusable (%s); recomputing", self.name, path, e)
                self.cache._discard(path)
                status = "recomputed"
            else:
                return self._done(fp, "loaded", t0, path, value)
        c0 = time.perf_counter()
        value = self.fn(*args, **kwargs)
        self.cache._write(self, fp, value, summary, time.perf_counter() - c0)
        return self._done(fp, status, t0, path, value)

    def _done(self, fp: str, status: str, t0: float, path: str, value: Any) -> Any:
        ev = StageEvent(self.name, fp, status, time.perf_counter() - t0, path)
        self.last_event = ev
        self.cache.history.append(ev)
        log.info("stage %s: %s (%s) in %.3fs", self.name, status, fp[:12], ev.seconds)
        return value

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, version={self.version!r}, cache={self.cache.directory!r})"


_caches: dict[tuple[str, bool, bool], StageCache] = {}


def checkpointed_stage(
    cache_dir: str | os.PathLike,
    *,
    name: str | None = None,
    version: str = "0",
    ignore: Iterable[str] = (),
    fsync: bool = True,
) -> Callable[[F], Stage]:
    """Module-level form of :meth:`StageCache.stage`: ``@checkpointed_stage("cache/", version="1")``.

    Stages decorated with the same ``cache_dir`` share one :class:`StageCache` (and its ``history``)."""
    key = (os.path.abspath(os.fspath(cache_dir)), fsync, True)
    cache = _caches.get(key)
    if cache is None:
        cache = _caches[key] = StageCache(cache_dir, fsync=fsync)
    return cache.stage(name=name, version=version, ignore=ignore)
