"""The ``labels`` of an nnU-Net dataset, checked as nnU-Net checks them (one rule for every command).

nnU-Net v2 (``LabelManager`` and ``verify_dataset_integrity``) requires:

- ``background`` is declared and is 0;
- every label value is a non-negative integer, or a list of them (a region, where allowed);
- the label values without ``ignore`` (regions flattened) are consecutive integers from 0:
  ``0, 1, 2, ...``; a network has one output per value, so labels 0 and 255 would need 256 outputs;
- ``ignore``, if present, is one integer, the highest label, one above the last class (so it is
  distinct from every class).

s3d adds one rule nnU-Net does not enforce: two classes may not share a value (a typo that would
score one structure twice). ``s3d finetune``, ``s3d predict`` (the model folder's labels) and
``s3d evaluate`` all call :func:`check_labels`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def label_problems(labels: Any, *, regions: bool = True) -> list[str]:
    """Every way ``labels`` (name -> value) breaks nnU-Net's rules (see the module docstring); ``[]`` if none.

    Args:
        labels: the ``labels`` mapping of a ``dataset.json`` or ``preprocessing.json``.
        regions: whether a list of values (an nnU-Net region) is allowed.

    Example:
        >>> label_problems({"background": 0, "lesion": 255})[0].endswith("found 0, 255; relabel 255 -> 1")
        True
    """
    if not isinstance(labels, Mapping) or not labels:
        return [f"labels must map names to values, e.g. {{\"background\": 0, \"tumour\": 1}}; found {labels!r}"]
    problems: list[str] = []
    values: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        vals = tuple(value) if isinstance(value, list | tuple) else (value,)
        if not vals or not all(_is_int(v) and v >= 0 for v in vals):
            problems.append(f"label {name!r} must be a non-negative integer{' or a list of them' if regions else ''}, "
                            f"found {value!r}")
        elif len(vals) > 1 and (not regions or name == "ignore"):
            problems.append(f"label {name!r} is a region (a list of values) {list(vals)}; "
                            + ("the ignore label must be one integer" if name == "ignore"
                               else "region-based labels are not supported here"))
        else:
            values[str(name)] = vals
    if "background" not in labels:
        problems.append("labels must declare \"background\": 0")
    elif "background" in values and values["background"] != (0,):
        problems.append(f"background must be 0, found {labels['background']!r}")
    if problems:
        return problems
    ignore = values.pop("ignore", None)
    classes = sorted({v for vals in values.values() for v in vals})
    gaps = [v for i, v in enumerate(classes) if v != i]
    if gaps:
        fix = ", ".join(f"{v} -> {classes.index(v)}" for v in gaps[:5])
        problems.append(f"label values must be consecutive integers from 0 (0, 1, 2, ...; one network output "
                        f"each): found {', '.join(map(str, classes))}; relabel {fix}")
    owner: dict[int, str] = {}
    for name, vals in values.items():
        if len(vals) == 1:
            if vals[0] in owner:
                problems.append(f"labels {owner[vals[0]]!r} and {name!r} share the value {vals[0]}; give each "
                                "class its own value")
            owner.setdefault(vals[0], name)
    if ignore is not None:
        (value,) = ignore
        highest = classes[-1] if classes else 0
        if value in classes:
            problems.append(f"the ignore label {value} is also a class ({owner.get(value, 'a region')}); it must be "
                            f"distinct from every class: use {highest + 1}")
        elif value != highest + 1:
            problems.append(f"the ignore label must be the highest label, one above the last class ({highest + 1}); "
                            f"found {value}")
    return problems


def check_labels(labels: Any, source: str | os.PathLike[str], *, regions: bool = True) -> None:
    """Raise ``ValueError`` naming ``source`` and every problem :func:`label_problems` finds.

    Example:
        >>> check_labels({"background": 0, "tumour": 1, "ignore": 2}, "dataset.json")   # passes
    """
    problems = label_problems(labels, regions=regions)
    if len(problems) == 1:
        raise ValueError(f"{source}: {problems[0]} (nnU-Net's label rules)")
    if problems:
        raise ValueError(f"{source}: {len(problems)} problems with the labels (nnU-Net's label rules): "
                         + "; ".join(problems))
