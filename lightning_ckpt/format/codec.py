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


def encode(
    obj: Any,
    on_unsupported: Callable[[str, Any], None] | None = None,
    key_fn: Callable[[str], str] | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``key_fn`` may rename tensor keys (the writer prefixes a rank's own tensors with its rank)."""
    tensors: dict[str, torch.Tensor] = {}
    kf = key_fn or (lambda k: k)

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
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes) -> int:
    """How deeply the JSON text ``raw`` nests (brackets inside strings not counted), without parsing it: a hostile
    state file is refused before the parser or the decoder recurse into it, whatever the recursion limit."""
    text = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    if not len(text):
        return 0
    step = ((text == ord("[")) | (text == ord("{"))).astype(np.int32) - ((text == ord("]")) | (text == ord("}")))
    return int(np.cumsum(step).max())


def decode(doc: Any, tensor_getter: Callable[[str], torch.Tensor]) -> Any:
    try:
        return _decode(doc, tensor_getter)
    except RecursionError:
        raise CheckpointCorruptError(
            "non-tensor state is nested too deeply to be a checkpoint; the state file is corrupt or hostile"
        ) from None


def _decode(doc: Any, tensor_getter: Callable[[str], torch.Tensor]) -> Any:
    def bad(what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"non-tensor state is malformed ({what}); the checkpoint is corrupt or was not written by lightning_ckpt")

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
        return {k: dec(v) for k, v in x.items()}

    def dec_tag(tag: str, val: Any) -> Any:
        try:
            if tag == "$t":
                return tensor_getter(val)
            if tag == "$np":
                return tensor_getter(val).cpu().numpy()
            if tag == "$tuple":
                return tuple(dec(v) for v in val)
            if tag == "$dict":
                return {_hashable(dec(k)): dec(v) for k, v in val}
            if tag == "$float":
                if val not in ("nan", "inf", "-inf"):
                    raise bad(f"float {val!r}")
                return float(val)
            if tag == "$set":
                return {_hashable(dec(v)) for v in val}
            if tag == "$bytes":
                return base64.b64decode(val.encode("ascii"), validate=True)
            if tag == "$npscalar":
                return np.dtype(val[0]).type(dec(val[1]))
            if tag == "$dtype":
                dt = getattr(torch, val, None)
                if not isinstance(dt, torch.dtype):
                    raise bad(f"dtype {val!r}")
                return dt
            if tag == "$size":
                return torch.Size([int(v) for v in val])
            if tag == "$device":
                if not isinstance(val, str):
                    raise bad(f"device {val!r}")
                try:
                    return torch.device(val)
                except RuntimeError:
                    raise bad(f"device {val!r}") from None
            if tag == "$path":
                return pathlib.Path(val)
            if tag == "$namespace":
                return argparse.Namespace(**dec(val))
            if tag == "$type":
                return _allowed_type(str(val))
            if tag == "$enum":
                return dec(val[1])
            if tag == "$repr":
                return str(val[1])
        except CheckpointCorruptError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise bad(f"{tag}: {e}") from None
        raise bad(f"unknown tag {tag!r}")

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
