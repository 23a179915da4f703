"""What several commands share: the ``--amp`` vocabulary (the same in Python and on every CLI)."""

from __future__ import annotations

# s3d.runtime.device.AMP_MODES, repeated here so that `s3d --help` does not import torch
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
