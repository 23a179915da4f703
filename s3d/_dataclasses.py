"""JSON round trips of the configuration dataclasses (model config, recipes, specs, fine-tuning runs)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

T = TypeVar("T")


def jsonable(value: Any) -> Any:
    """Canonical JSON form of ``value``: tuples become lists, recursively (a config equals its round trip).

    Example:
        >>> jsonable({"patch": (64, 64, 64)})
        {'patch': [64, 64, 64]}
    """
    return json.loads(json.dumps(value))


def to_jsonable_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict(obj)`` in canonical JSON form (tuples become lists).

    Example:
        >>> to_jsonable_dict(ResEncUNetConfig())["strides"][:2]
        [1, 2]
    """
    return jsonable(dataclasses.asdict(obj))


def from_dict_strict(cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**d)`` for a dataclass ``cls``; keys that are not fields are a ``ValueError`` naming them.

    Example:
        >>> from_dict_strict(ResEncUNetConfig, {"name": "tiny", "depth": 3})
        Traceback (most recent call last):
        ValueError: unknown ResEncUNetConfig keys ['depth']; known keys: [...]
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)
