"""Optional packages: import them where a feature uses them, with one line naming what to install.

``import s3d``, the models, the sparse MAE wrapper, the zoo and ``load_pretrained`` need only torch,
numpy, einops, safetensors, huggingface_hub and timm: a bare PyTorch image (docs/install.md). NIfTI
I/O needs nibabel, the default pre-training store blosc2, progress bars tqdm (without it they are off).
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    """A feature needs a package that is not installed. The message is one line: what needs which
    package and the command that installs it; the ``s3d`` command prints it and exits 1."""


def optional_import(module: str, feature: str, package: str | None = None, hint: str = "") -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingDependency` saying how to install it.

    Args:
        module: the import name, e.g. ``"nibabel"``.
        feature: what needs it, as the start of a sentence, e.g. ``"reading NIfTI"``.
        package: the pip package when it differs from ``module``.
        hint: appended to the message, e.g. ``" (or prepare with --store npy)"``.

    Example:
        >>> optional_import("math", "counting").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        pip = package or module.split(".")[0]
        raise MissingDependency(f"{feature} needs {pip}: pip install {pip}{hint}") from None


__all__ = ["MissingDependency", "optional_import"]
