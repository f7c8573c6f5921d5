"""Non-tensor state as JSON, tensors pulled out by path. Decoding never imports or calls user code.

``encode(obj)`` walks a checkpoint dictionary and returns ``(doc, tensors)``: ``doc`` is plain JSON where every
tensor was replaced by ``{"$t": key}`` and ``tensors`` maps those keys to the tensors. Python values JSON cannot
hold directly (tuples, non-string dict keys, NaN, bytes, dtypes, ...) are written as one-key objects whose key
starts with ``$``. ``decode(doc, tensors)`` reverses it. Objects of other classes cannot be restored without
running their code, so they are stored as ``{"$repr": ...}`` (with a warning at save time) and come back as strings.
"""
from __future__ import annotations

import argparse
import base64
import enum
import json
import math
import pathlib
import re
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import CheckpointCorruptError, CheckpointError

SEP = "/"


def escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def join_key(path: tuple[str, ...]) -> str:
    return SEP.join(escape(p) for p in path)


def split_key(key: str) -> list[str]:
    return [unescape(p) for p in key.split(SEP)]


_SAFE_TYPES: dict[str, type] = {"builtins.dict": dict, "argparse.Namespace": argparse.Namespace}
# types a checkpoint may name that stand for a dict when their library is not loaded (Lightning's hparams type)
_DICT_LIKE = {"lightning.fabric.utilities.data.AttributeDict"}


def register_safe_type(t: type) -> None:
    """Let decoding return the class ``t`` for a ``{"$type": ...}`` naming it (a class, never an instance: no code of
    it runs). The Lightning layer registers Lightning's ``AttributeDict``, the type of ``hparams``."""
    _SAFE_TYPES[_qualname(t)] = t


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _allowed_type(name: str) -> Any:
    if name in _SAFE_TYPES:
        return _SAFE_TYPES[name]
    if name in _DICT_LIKE:
        return dict
    return name


_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))


def encode(
    obj: Any,
    on_unsupported: Callable[[str, Any], None] | None = None,
    key_fn: Callable[[str], str] | None = None,
    cache: dict | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``key_fn`` may rename tensor keys (the writer prefixes a rank's own tensors with its rank).

    ``cache``: a dict the caller keeps between calls with the same ``key_fn`` (the writer keeps one). A mapping of
    string keys whose values are all plain tensors (a model's ``state_dict``) is then encoded in bulk: its document
    and tensor keys are remembered by path and reused while its keys stay the same (one list comparison, the tensors
    taken with one ``zip``), instead of being built per tensor at every save. The document returned shares those
    remembered parts: treat it as read-only."""
    tensors: dict[str, torch.Tensor] = {}
    kf = key_fn or (lambda k: k)

    def bulk(x: Any, path: tuple[str, ...]) -> Any:
        vals = list(x.values())
        if len(path) >= MAX_DEPTH or not set(map(type, vals)) <= _PLAIN_TENSORS:
            return None
        keys = list(x)
        hit = cache.get(path)
        if hit is None or hit[0] != keys:
            if not all(isinstance(k, str) and not k.startswith("$") for k in keys):
                return None
            prefix = join_key(path) + SEP if path else ""
            tkeys = [kf(prefix + escape(k)) for k in keys]
            hit = cache[path] = (keys, {k: {"$t": tk} for k, tk in zip(keys, tkeys)}, tkeys)
        tensors.update(zip(hit[2], vals))
        return hit[1]

    def enc(x: Any, path: tuple[str, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise CheckpointError(
                f"the state to save nests deeper than {MAX_DEPTH} levels at {join_key(path[:8])}/...; a checkpoint's "
                "non-tensor state must be a shallow structure (flatten it, or keep it out of the checkpoint)")
        if isinstance(x, torch.Tensor):
            key = kf(join_key(path))
            tensors[key] = x
            return {"$t": key}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, enum.Enum):
            return {"$enum": [_qualname(type(x)), enc(x.value, path)]}
        if isinstance(x, np.generic):  # before int/float: np.float64 is a float subclass
            return {"$npscalar": [str(x.dtype), enc(x.item(), path)]}
        if isinstance(x, torch.Size):  # before tuple: torch.Size is a tuple subclass
            return {"$size": [int(s) for s in x]}
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            if math.isfinite(x):
                return float(x)
            return {"$float": repr(x)}
        if isinstance(x, Mapping):
            if cache is not None and len(x) > 1:
                doc = bulk(x, path)
                if doc is not None:
                    return doc
            items = list(x.items())
            if all(isinstance(k, str) and not k.startswith("$") for k, _ in items):
                return {k: enc(v, path + (k,)) for k, v in items}
            # value paths use str(key) (readable tensor names such as optimizer_states/0/state/3/exp_avg) unless two
            # keys print the same (0 and "0") or look like a tag; then the position keeps them apart
            names = [str(k) for k, _ in items]
            if len(set(names)) != len(names) or any(n.startswith("$") for n in names):
                names = [f"$v{i}" for i in range(len(items))]
            return {"$dict": [[enc(k, path + ("$key", str(i))), enc(v, path + (n,))] for i, ((k, v), n) in enumerate(zip(items, names))]}
        if isinstance(x, tuple):
            if hasattr(x, "_fields"):  # namedtuple: keep the values
                return {"$tuple": [enc(v, path + (str(i),)) for i, v in enumerate(x)]}
            return {"$tuple": [enc(v, path + (str(i),)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, path + (str(i),)) for i, v in enumerate(x)]
        if isinstance(x, (set, frozenset)):
            return {"$set": [enc(v, path + (str(i),)) for i, v in enumerate(sorted(x, key=repr))]}
        if isinstance(x, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(x)).decode("ascii")}
        if isinstance(x, np.ndarray):
            if x.dtype.kind in "biuf" or x.dtype == np.bool_:
                key = kf(join_key(path))
                tensors[key] = torch.from_numpy(np.ascontiguousarray(x))
                return {"$np": key}
        if isinstance(x, torch.dtype):
            return {"$dtype": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return {"$device": str(x)}
        if isinstance(x, pathlib.PurePath):
            return {"$path": str(x)}
        if isinstance(x, argparse.Namespace):
            return {"$namespace": enc(vars(x), path)}
        if isinstance(x, type):
            return {"$type": _qualname(x)}
        if on_unsupported is not None:
            on_unsupported(join_key(path), x)
        return {"$repr": [_qualname(type(x)), repr(x)[:2000]]}

    return enc(obj, ()), tensors


MAX_DEPTH = 200  # nesting of the state a save accepts (Lightning's checkpoint dictionaries nest about ten deep)
MAX_JSON_DEPTH = 2 * MAX_DEPTH + 16  # what a reader accepts (tagged values such as tuples nest two JSON levels)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # (unrolled: about 2.5x faster than an alternation)


def json_depth(raw: bytes) -> int:
    """How deeply the JSON text ``raw`` nests (brackets inside strings not counted), without parsing it: a hostile
    state file is refused before the parser or the decoder recurse into it, whatever the recursion limit."""
    return _scan(raw)[0]


def json_memory(raw: bytes) -> int:
    """About how many bytes of Python objects parsing ``raw`` builds: 64 per container and per value separator
    (``,`` ``:``) plus the text. Measured against ``json.loads`` (tracemalloc, 2 MB documents of each shape): 0.9-1.7x
    the real size for dicts, lists, key/value pairs, floats and strings, 5x for lists of small integers (shared)."""
    return _scan(raw)[1]


def _scan(raw: bytes) -> tuple[int, int]:
    text = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    if not len(text):
        return 0, 0
    opens = (text == ord("[")) | (text == ord("{"))
    step = opens.astype(np.int32) - ((text == ord("]")) | (text == ord("}")))
    seps = int(np.count_nonzero((text == ord(",")) | (text == ord(":"))))
    return int(np.cumsum(step).max()), 64 * (int(np.count_nonzero(opens)) + seps) + len(raw)


MAX_STATE_MEMORY = 2 << 30  # estimated Python objects of one state document (decoding builds about as much again)


def parse_state(raw: bytes, where: str) -> Any:
    """The JSON document of a state file, or CheckpointCorruptError: too deep to parse safely, building more Python
    objects than ``MAX_STATE_MEMORY`` (a 1 GiB file of ``{},`` would build about 20 GiB), not UTF-8, not JSON, or
    holding a number Python refuses to convert (an integer of more than 4300 digits)."""
    depth, memory = _scan(raw)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointCorruptError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; the state file is corrupt "
                                     "or hostile")
    if memory > MAX_STATE_MEMORY:
        raise CheckpointCorruptError(
            f"{where} would build about {memory >> 20} MiB of Python objects, more than the {MAX_STATE_MEMORY >> 20} "
            "MiB a checkpoint's non-tensor state may take; the state file is corrupt or hostile (large data belongs "
            "in tensors)")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError, OverflowError, MemoryError) as e:  # JSONDecodeError, UnicodeDecodeError too
        raise CheckpointCorruptError(f"{where} is not valid JSON ({str(e)[:200]}); the state file is corrupt or "
                                     "hostile") from None


def decode(doc: Any, tensor_getter: Callable[[str], torch.Tensor]) -> Any:
    """The state ``doc`` (as :func:`encode` wrote it) with its tagged values rebuilt and each ``{"$t": key}`` replaced
    by ``tensor_getter(key)`` (called once per key: a key named again gets the same tensor).

    Every value is bounded by the text that encodes it before it is built (numbers, strings, bytes: at most a small
    factor of their JSON; no tag builds a value from a count: a ``numpy.void`` of a declared size or a ``torch.Size``
    of an impossible extent is refused), and every malformed value is a :class:`CheckpointCorruptError`, never a raw
    ``TypeError``/``OverflowError``/``RecursionError``: listing and ``latest_checkpoint`` skip such a checkpoint."""
    try:
        return _decode(doc, tensor_getter)
    except RecursionError:
        raise CheckpointCorruptError(
            "non-tensor state is nested too deeply to be a checkpoint; the state file is corrupt or hostile"
        ) from None


_NPSCALAR_KINDS = "biuf"  # numpy scalars a state may hold (what encode writes for np.generic numbers); strings below
_MAX_DIM = 1 << 62


def _npscalar(val: Any, bad: Callable[[str], CheckpointCorruptError], dec: Callable[[Any], Any]) -> Any:
    """A numpy scalar: a number of a plain numeric dtype, or a str_/bytes_ of the text given; never a structured,
    sub-array, object or void dtype (``numpy.void(n)`` allocates n bytes from one JSON integer)."""
    if not (isinstance(val, list) and len(val) == 2 and isinstance(val[0], str) and len(val[0]) <= 32):
        raise bad(f"$npscalar {str(val)[:80]!r}")
    name = val[0]
    try:
        dt = np.dtype(name)
    except (TypeError, ValueError, SyntaxError) as e:
        raise bad(f"$npscalar dtype {name!r}: {e}") from None
    if dt.fields is not None or dt.subdtype is not None:
        raise bad(f"$npscalar dtype {name!r}")
    v = dec(val[1])  # a number, {"$float": "inf"}, a string or {"$bytes": ...}: bounded by its text
    if dt.kind in _NPSCALAR_KINDS and isinstance(v, (bool, int, float)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an out-of-range float is an error here, not a silent inf
            try:
                return dt.type(v)
            except (OverflowError, ValueError, TypeError, RuntimeWarning) as e:
                raise bad(f"$npscalar {name} {str(v)[:40]}: {e}") from None
    if dt.kind == "U" and isinstance(v, str):
        return np.str_(v)
    if dt.kind in "SV" and isinstance(v, bytes):  # the bytes given, never a count
        return dt.type(v)
    raise bad(f"$npscalar of dtype {name!r} and value {str(v)[:40]!r}")


def _b64(val: Any, bad: Callable[[str], CheckpointCorruptError]) -> bytes:
    if not isinstance(val, str):
        raise bad("$bytes is not a string")
    try:
        return base64.b64decode(val.encode("ascii"), validate=True)  # 3/4 of the text's length
    except (ValueError, UnicodeEncodeError) as e:
        raise bad(f"$bytes: {e}") from None


def _decode(doc: Any, tensor_getter: Callable[[str], torch.Tensor]) -> Any:
    def bad(what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"non-tensor state is malformed ({what}); the checkpoint is corrupt or was not written by lightning_ckpt")

    tensors: dict[str, Any] = {}  # a key named twice is one tensor, not two copies (a 10 KB state, 100 GB of copies)

    def tensor(key: Any) -> Any:
        if not isinstance(key, str):
            raise bad(f"tensor key {str(key)[:80]!r}")
        if key not in tensors:
            tensors[key] = tensor_getter(key)
        return tensors[key]

    def dec(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            raise bad(f"unexpected JSON value of type {type(x).__name__}")
        if len(x) == 1:
            (tag, val), = x.items()
            if tag.startswith("$"):
                return dec_tag(tag, val)
        if len(x) >= 16:  # a state_dict: every value a tensor reference, decoded with one list pass
            keys = [v.get("$t") if type(v) is dict and len(v) == 1 else None for v in x.values()]
            if None not in keys:
                return dict(zip(x, map(tensor, keys)))
        return {k: dec(v) for k, v in x.items()}

    def items(val: Any, tag: str) -> list:
        if not isinstance(val, list):
            raise bad(f"{tag} holds a {type(val).__name__}, not a list")
        return val

    def dec_tag(tag: str, val: Any) -> Any:
        try:
            if tag == "$t":
                return tensor(val)
            if tag == "$np":
                return tensor(val).cpu().numpy()
            if tag == "$tuple":
                return tuple(dec(v) for v in items(val, tag))
            if tag == "$dict":
                return {_hashable(dec(k)): dec(v) for k, v in items(val, tag)}
            if tag == "$float":
                if val not in ("nan", "inf", "-inf"):
                    raise bad(f"float {str(val)[:40]!r}")
                return float(val)
            if tag == "$set":
                return {_hashable(dec(v)) for v in items(val, tag)}
            if tag == "$bytes":
                return _b64(val, bad)
            if tag == "$npscalar":
                return _npscalar(val, bad, dec)
            if tag == "$dtype":
                dt = getattr(torch, val, None) if isinstance(val, str) else None
                if not isinstance(dt, torch.dtype):
                    raise bad(f"dtype {str(val)[:40]!r}")
                return dt
            if tag == "$size":
                dims = items(val, tag)
                if not all(type(v) is int and 0 <= v < _MAX_DIM for v in dims) or len(dims) > 64:
                    raise bad(f"$size {str(val)[:80]}")
                return torch.Size(dims)
            if tag == "$device":
                if not isinstance(val, str) or len(val) > 64:
                    raise bad(f"device {str(val)[:40]!r}")
                try:
                    return torch.device(val)
                except RuntimeError:
                    raise bad(f"device {val!r}") from None
            if tag == "$path":
                if not isinstance(val, str):
                    raise bad(f"path {str(val)[:40]!r}")
                return pathlib.Path(val)
            if tag == "$namespace":
                fields = dec(val)
                if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
                    raise bad("$namespace is not a mapping of names")
                return argparse.Namespace(**fields)
            if tag == "$type":
                return _allowed_type(str(val))
            if tag == "$enum":
                return dec(items(val, tag)[1])
            if tag == "$repr":
                return str(items(val, tag)[1])
        except CheckpointCorruptError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
            raise bad(f"{tag}: {str(e)[:200]}") from None
        raise bad(f"unknown tag {tag[:40]!r}")

    return dec(doc)


def _hashable(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    return x


def warn_unsupported(key: str, value: Any) -> None:
    warnings.warn(
        f"lightning_ckpt: the value at {key!r} is a {type(value).__module__}.{type(value).__qualname__}, which cannot "
        "be stored without pickle; its repr() is saved instead and it will load back as a string. Store plain "
        "Python values (numbers, strings, lists, dicts) or tensors in checkpointed state.",
        stacklevel=2,
    )
