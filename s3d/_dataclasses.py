"""JSON round trips of the configuration dataclasses (model config, recipes, specs, fine-tuning runs)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
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


def config_from(config: str | T | dict[str, Any], cls: type[T], preset: Callable[[str], T]) -> T:
    """A fresh ``cls`` from what a ``build_*`` function takes as ``config``: a preset name (``preset(name)``),
    an instance (copied with its ``replace()``) or a dict (``cls.from_dict``); anything else is a
    ``TypeError`` naming the argument.

    Example:
        >>> config_from({"name": "tiny"}, ResEncUNetConfig, get_config).name
        'tiny'
    """
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, cls):
        return config.replace()  # type: ignore[attr-defined]
    if isinstance(config, dict):
        return cls.from_dict(config)  # type: ignore[attr-defined]
    raise TypeError(f"config: expected a preset name, {cls.__name__} or dict, got {type(config).__name__}")
