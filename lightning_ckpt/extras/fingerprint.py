"""Fingerprints of stage calls (see :mod:`lightning_ckpt.extras.stages`): a function's code without formatting, and
argument values by content (tensors by dtype, shape and CRC32C, remembered for the outputs this process wrote or
verified, so chaining stages costs no hashing). No pickle: values that cannot be described by content are refused."""
from __future__ import annotations

import ast
import enum
import hashlib
import inspect
import json
import marshal
import pathlib
import textwrap
import weakref
from typing import Any, Callable

import numpy as np
import torch

from ..compat import tensor_version
from ..errors import CheckpointError
from ..format.checksum import crc32c
from ..format.codec import encode
from ..format.tensorfile import byte_view


class UncacheableValueError(CheckpointError, TypeError):
    """A stage argument cannot be fingerprinted, or a stage output cannot be stored without pickle."""


# CRC32C of the bytes of tensors this process wrote or verified as stage outputs, keyed by id() and guarded by a weak
# reference and the tensor's version counter (bumped by in-place operations), so chaining stages costs no hashing.
_known_crcs: dict[int, tuple[weakref.ref, int, int]] = {}


def _version_of(t: torch.Tensor) -> int | None:
    return tensor_version(t)


def remember_crc(t: torch.Tensor, crc: int) -> None:
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
    return crc32c(byte_view(plain_tensor(t)))


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A dense contiguous CPU tensor without autograd history, holding the same values."""
    t = t.detach()
    if t.layout != torch.strided:
        raise UncacheableValueError(f"a {t.layout} tensor cannot be cached; convert it with .to_dense()")
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


def code_identity(fn: Callable) -> str:
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


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def value_digest(value: Any, what: str) -> Any:
    """A JSON-able description of ``value`` that is equal for equal content: the codec document with every tensor
    replaced by its dtype, shape and CRC32C."""

    def unsupported(key: str, x: Any) -> None:
        raise UncacheableValueError(
            f"{what}{'/' + key if key else ''} is a {type(x).__module__}.{type(x).__qualname__}, which cannot be "
            "fingerprinted by content. Pass plain values (numbers, strings, lists, dicts), tensors or numpy arrays, "
            "or name the parameter in ignore=(...) and bump version= yourself when it changes."
        )

    check_no_objects(value, what)
    doc, tensors = encode(value, on_unsupported=unsupported)
    return {
        "doc": doc,
        "tensors": {k: [str(t.dtype), list(t.shape), _tensor_crc(t)] for k, t in sorted(tensors.items())},
    }


def check_no_objects(value: Any, what: str, _depth: int = 0) -> None:
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
            check_no_objects(v, f"{what}[{i}]", _depth + 1)
        return
    if type(value) is dict:
        for k, v in value.items():
            check_no_objects(k, f"{what} key {k!r}", _depth + 1)
            check_no_objects(v, f"{what}[{k!r}]", _depth + 1)
        return
    raise UncacheableValueError(
        f"{what} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be stored or fingerprinted "
        "without pickle. Use tensors, numpy arrays, numbers, strings, bytes and lists/tuples/dicts/sets of them "
        "(a stage argument may also be named in ignore=(...))."
    )
