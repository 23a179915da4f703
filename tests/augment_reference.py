"""Write ``tests/data/augment_bgv2.npz``: nnU-Net's own transforms (batchgeneratorsv2) at fixed parameters.

tests/test_augment.py compares s3d.augment against this file. It needs batchgeneratorsv2, which s3d
does not depend on; run it in a separate environment:

    python3 -m venv /tmp/venv-aug && /tmp/venv-aug/bin/pip install torch batchgeneratorsv2 pandas scikit-image
    /tmp/venv-aug/bin/python tests/augment_reference.py

Each transform gets the settings of nnU-Net's ``get_training_transforms`` and the parameters below
(fixed instead of drawn); the inputs are seeded. The file was written with batchgeneratorsv2 0.3.6
and torch 2.14.1 (CPU).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).parent / "data" / "augment_bgv2.npz"
SHAPE = (12, 10, 8)
# (angles about axes 0, 1, 2 in batchgeneratorsv2's convention, radians; isotropic scale)
SPATIAL = [((math.radians(20.0), math.radians(-12.0), math.radians(7.0)), 1.0),
           ((math.radians(-25.0), math.radians(28.0), math.radians(-15.0)), 1.35),
           ((0.0, 0.0, 0.0), 0.75)]
BLUR_SIGMA = [[0.5, 0.8, 1.0], [0.95, 0.6, 0.7]]   # per channel, per axis (voxels)
LOWRES_SCALE = [0.5, 0.73]                          # per channel
CONTRAST = [0.8, 1.2]
BRIGHTNESS = [0.9, 1.1]
GAMMA = [0.75, 1.4]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-channel image (2, *SHAPE) float32 and a 4-label map (1, *SHAPE) int16 of smooth blobs."""
    rng = np.random.default_rng(16)
    img = torch.from_numpy(rng.normal(size=(2, *SHAPE)).astype(np.float32))
    coarse = torch.from_numpy(rng.normal(size=(1, 1, 4, 4, 3)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=SHAPE, mode="trilinear", align_corners=True)[0]
    seg = torch.bucketize(smooth, torch.quantile(smooth.flatten(), torch.tensor([0.4, 0.65, 0.85]))).to(torch.int16)
    return img, seg


def main() -> None:
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    img, seg = inputs()
    out: dict[str, np.ndarray] = {"image": img.numpy(), "seg": seg.numpy()}
    for i, (angles, scale) in enumerate(SPATIAL):
        spatial = SpatialTransform(
            SHAPE, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0, p_rotation=1,
            rotation=lambda image, dim, a=angles: a[dim], p_scaling=1, scaling=lambda image, dim, s=scale: s,
            p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, border_mode_seg="constant",
            padding_value_seg=-1)
        d = RemoveLabelTansform(-1, 0)(**spatial(image=img.clone(), segmentation=seg.clone()))
        out[f"spatial{i}_angles"], out[f"spatial{i}_scale"] = np.array(angles), np.array(scale)
        out[f"spatial{i}_image"], out[f"spatial{i}_seg"] = d["image"].numpy(), d["segmentation"].numpy()
    both = torch.tensor([0, 1])
    blur = GaussianBlurTransform((0.5, 1.0), synchronize_channels=False, synchronize_axes=False, p_per_channel=1)
    out["blur"] = blur._apply_to_image(img.clone(), apply_to_channel=torch.tensor([True, True]),
                                       sigmas=BLUR_SIGMA).numpy()
    lowres = SimulateLowResolutionTransform((0.5, 1), synchronize_channels=False, synchronize_axes=True,
                                            ignore_axes=None)
    out["lowres"] = lowres._apply_to_image(img.clone(), apply_to_channel=both,
                                           scales=torch.tensor([[s] * 3 for s in LOWRES_SCALE])).numpy()
    contrast = ContrastTransform(BGContrast((0.75, 1.25)), preserve_range=True, synchronize_channels=False)
    out["contrast"] = contrast._apply_to_image(img.clone(), apply_to_channel=both,
                                               multipliers=torch.tensor(CONTRAST)).numpy()
    bright = MultiplicativeBrightnessTransform(BGContrast((0.75, 1.25)), synchronize_channels=False)
    out["brightness"] = bright._apply_to_image(img.clone(), apply_to_channel=both,
                                               multipliers=torch.tensor(BRIGHTNESS)).numpy()
    for name, invert in (("gamma", False), ("gamma_inverted", True)):
        gamma = GammaTransform(BGContrast((0.7, 1.5)), p_invert_image=float(invert), synchronize_channels=False,
                               p_per_channel=1, p_retain_stats=1)
        out[name] = gamma._apply_to_image(img.clone(), apply_to_channel=both, retain_stats=torch.tensor([True, True]),
                                          invert_image=torch.tensor([invert, invert]),
                                          gamma=torch.tensor(GAMMA)).numpy()
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {sorted(out)}")


if __name__ == "__main__":
    main()
