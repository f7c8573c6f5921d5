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

import functools
import hashlib
import inspect
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar, overload


from ..errors import CheckpointError
from ..store import LocalStore
from .fingerprint import UncacheableValueError, canonical, code_identity, value_digest
from .results import STAGE_FORMAT_VERSION, load_result, write_result

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

_FP_RE = re.compile(r"[0-9a-f]{64}\Z")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+@,-]")


class StageCacheWarning(UserWarning):
    """A cached stage result was corrupt, unreadable or from a newer release; it is recomputed."""


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
            store = LocalStore(sdir)
            for fp in store.names():
                if not _FP_RE.match(fp):
                    continue
                path = store.path(fp)
                try:
                    m = store.read_manifest(fp)[0]
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
            removed += LocalStore(sdir).cleanup(everyone=False)
        return removed

    # -------------------------------------------------------------- internals
    def _entry_path(self, stage_name: str, fp: str) -> str:
        return os.path.join(self.directory, _safe_name(stage_name), fp)

    def _discard(self, path: str) -> None:
        parent, base = os.path.split(path)
        LocalStore(parent).delete(base)

    def _load(self, path: str, fp: str) -> Any:
        """Read a committed result, checking every byte. Raises a CheckpointError subclass on anything wrong."""
        return load_result(path, fp, self.verify)

    def _write(self, stage: "Stage", fp: str, value: Any, key_summary: dict, compute_s: float) -> str:
        info = {"name": stage.name, "fingerprint": fp, "version": stage.version, "compute_s": round(compute_s, 6),
                "key": key_summary}
        return write_result(self._entry_path(stage.name, fp), info, value, self.fsync)


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
        self._code = code_identity(fn)
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
        digest = {k: value_digest(v, f"argument {k!r} of stage {self.name!r}") for k, v in params.items()}
        doc = {
            "lightning_ckpt_stage": STAGE_FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "code": hashlib.sha256(self._code.encode()).hexdigest(),
            "args": digest,
        }
        fp = hashlib.sha256(canonical(doc)).hexdigest()
        summary = {"code_sha256": doc["code"], "args_sha256": {k: hashlib.sha256(canonical(v)).hexdigest()[:16] for k, v in digest.items()}}
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
