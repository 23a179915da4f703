"""The reference network for tests and benchmarks: DNA's ResidualEncoderUNet built from an s3d config.

dynamic-network-architectures (DNA) is nnU-Net's own architecture package; s3d's state dict must
equal its canonical keys, and both must compute the same function.
"""

from __future__ import annotations

import copy

import torch
from dynamic_network_architectures.architectures import unet as dna_unet
from torch import nn

from s3d.nn import ResEncUNetConfig


def build_dna(cfg: ResEncUNetConfig) -> nn.Module:
    """DNA's ResidualEncoderUNet with the same configuration (the nnU-Net ResEnc plans layout)."""
    norm = nn.InstanceNorm3d if cfg.norm == "instance" else nn.BatchNorm3d
    return dna_unet.ResidualEncoderUNet(
        input_channels=cfg.in_channels,
        n_stages=cfg.n_stages,
        features_per_stage=list(cfg.features_per_stage),
        conv_op=nn.Conv3d,
        kernel_sizes=[list(k) for k in cfg.kernel_sizes],
        strides=[list(s) for s in cfg.strides],
        n_blocks_per_stage=list(cfg.n_blocks_per_stage),
        num_classes=cfg.num_classes,
        n_conv_per_stage_decoder=list(cfg.n_conv_per_stage_decoder),
        conv_bias=cfg.conv_bias,
        norm_op=norm,
        norm_op_kwargs={"eps": cfg.norm_eps, "affine": cfg.norm_affine},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": cfg.negative_slope, "inplace": True},
        deep_supervision=cfg.deep_supervision,
    )


def canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DNA's state dict without its alias keys (``all_modules`` copies, ``decoder.encoder``)."""
    return {k: v for k, v in state.items() if ".all_modules." not in k and not k.startswith("decoder.encoder.")}


def load_into_dna(dna: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = dna.load_state_dict(state, strict=False)
    assert not unexpected
    # every missing key is an alias of a loaded tensor (same storage in DNA)
    assert all(".all_modules." in k or k.startswith("decoder.encoder.") for k in missing)


def assert_same_function(ours: torch.Tensor, theirs: torch.Tensor, dna: nn.Module, x: torch.Tensor,
                         index: int | None = None, always: bool = True) -> None:
    """s3d's float32 output vs DNA's (same weights, input ``x``): bitwise equal, or as close to a float64
    run of ``dna`` as DNA's own float32 output is (the yardstick of tests/tolerance.py).

    Both networks run the same kernels in the same order, so on most CPUs they are identical; another
    op order may round differently, a mis-mapped key or mis-wired layer is off by O(1). ``index``: the
    output of a deep-supervision list. ``always=False`` skips the float64 run when the two are
    identical (resenc_l: ~30 CPU-s per float64 forward at 64^3).
    """
    from tolerance import assert_yardstick, max_rel  # tests/ is on sys.path wherever this module is

    if not always and torch.equal(ours, theirs):
        return
    with torch.no_grad():
        ref = copy.deepcopy(dna).double()(x.double())
    ref = ref if index is None else ref[index]
    assert_yardstick(max_rel(ours, ref), max_rel(theirs, ref), "s3d vs DNA")
