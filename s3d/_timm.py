"""Importing timm without its import-time deprecation noise.

``import timm`` imports every model module, and one of them (``timm.models.hrnet``) calls
``torch.jit.interface``, which torch >= 2.10 marks deprecated with a ``FutureWarning`` at import time.
That warning is about timm's code, not the user's, and printed in the middle of ``s3d demo`` it reads
as a problem with their run. Only that one message is silenced, only during the import.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

_TIMM_IMPORT_NOISE = r"`torch\.jit\.interface` is deprecated"


@contextlib.contextmanager
def quiet_timm_import() -> Iterator[None]:
    """Context for ``import timm...`` lines: hides timm's import-time ``torch.jit.interface`` warning.

    Example:
        >>> with quiet_timm_import():
        ...     import timm
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TIMM_IMPORT_NOISE, category=FutureWarning)
        yield
