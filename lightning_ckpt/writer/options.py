"""Validation of settings, in one place: the writer and the callbacks' ``SaveOptions`` call these, so a bad value gets
the same ``ValueError`` (naming the setting, the value and what is accepted) wherever it is given."""
from __future__ import annotations

import math
import string
from typing import Any, Iterable

from ..format import manifest as mf


def check_choice(name: str, value: Any, choices: Iterable[Any], hint: str = "") -> Any:
    choices = tuple(choices)
    if not any(value == c and type(value) is type(c) for c in choices):
        shown = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is invalid; use {shown}{' (' + hint + ')' if hint else ''}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid; use True or False")
    return value


def check_seconds(name: str, value: Any, *, optional: bool = False) -> float | None:
    """A positive, finite number of seconds (None allowed when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid; it must be a positive, finite number of seconds"
                         + (" or None" if optional else ""))
    return float(value)


def check_fraction(name: str, value: Any, *, optional: bool = False) -> float | None:
    """A positive, finite fraction such as 0.05 (None allowed when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid; it must be a positive, finite fraction such as 0.05"
                         + (" or None" if optional else ""))
    return float(value)


def check_positive_int(name: str, value: Any, *, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; it must be a positive integer{' or None' if optional else ''}")
    return value


def template_fields(template: str) -> set[str]:
    return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f}


def validate_name_template(template: Any) -> str:
    """A template must give a plain folder name from ``step``, ``epoch`` and (optionally) logged metrics."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"name_template={template!r} is invalid: give a format string such as 'step={{step:06d}}'")
    try:
        fields = template_fields(template)
        sample = template.format(**{f: 0.5 if f not in ("step", "epoch") else 123 for f in fields})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise ValueError(
            f"name_template={template!r} is invalid ({e}); use fields such as {{step}}, {{epoch}} and logged metrics, "
            "for example 'step={step:06d}' or 'epoch={epoch}-step={step}'"
        ) from None
    if "step" not in fields and "epoch" not in fields:
        raise ValueError(
            f"name_template={template!r} is invalid: it must contain {{step}} (or {{epoch}}), so that each checkpoint "
            "gets its own name")
    if not mf.is_plain_name(sample):
        raise ValueError(
            f"name_template={template!r} gives the folder name {sample!r}; names must be plain (letters, digits, "
            "'_.=+@,-'), must not start with '.', and must not contain '/'"
        )
    return template


def format_name(template: str, step: int, epoch: int | None, metrics: dict | None) -> str:
    """A checkpoint's folder name from its template: ``step``, ``epoch`` and any logged metric (a metric not logged
    yet counts as 0, as in Lightning); characters a folder name may not hold become ``_``."""
    import re

    values: dict[str, Any] = {}
    for f in template_fields(template):
        if f in ("step", "epoch"):
            continue
        v = (metrics or {}).get(f, 0.0)
        try:
            values[f] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError):
            values[f] = 0.0
    name = template.format(step=int(step), epoch=int(epoch or 0), **values)
    name = re.sub(r"[^A-Za-z0-9_.=+@,-]", "_", name).lstrip(".") or "checkpoint"
    return name[: mf.MAX_NAME]
