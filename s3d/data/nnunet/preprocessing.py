"""How raw images become network input and back: :class:`PreprocessingSpec`, one case forward and inverse.

Preprocessing follows the paper's pre-training and nnU-Net's ``preprocess_like_nnssl``: crop to the
nonzero bounding box, z-score per channel, resample to the target spacing (1 mm isotropic by
default). :func:`preprocess_case` maps a raw case into that space and returns the ``properties``
that :func:`restore_geometry` needs to map a prediction back onto the original voxel grid.
``tests/test_nnunet_parity.py`` checks the result against nnunetv2's own preprocessor.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3d._dataclasses import from_dict_strict, to_jsonable_dict
from s3d._fs import write_json_atomic
from s3d._paths import check_file_ending
from s3d._triple import to_3tuple
from s3d.data.io import read_nifti
from s3d.data.labels import label_problems
from s3d.data.nnunet.dataset import AFFINE_ATOL_MM, NnUNetDataset
from s3d.data.preprocess import (
    anisotropic_axis,
    crop_to_nonzero,
    nonzero_mask,
    resample_image,
    resample_seg,
    shape_for_spacing,
    zscore,
)


@dataclass
class PreprocessingSpec:
    """How raw images become network input; saved as ``preprocessing.json`` next to a model.

    Attributes:
        target_spacing_mm: voxel spacing after resampling, mm per voxel along (D, H, W).
        channel_names: input channels in order (``imagesTr/{case}_0000`` is the first).
        labels: label name -> value, as in dataset.json; a list of values is an nnU-Net region
            (prediction only: the network has one sigmoid output per region, see ``regions``).
        normalization: ``"zscore"`` (per channel).
        use_mask_for_norm: z-score statistics over the nonzero mask only, voxels outside it 0
            (nnU-Net's ``use_mask_for_norm``); False (default, as the nnssl pre-training): over the
            whole cropped image. ``from_dataset(ds, use_mask_for_norm="auto")`` applies nnU-Net's
            rule (:func:`nnunet_use_mask_for_norm`).
        crop_to_nonzero: crop to the bounding box of voxels nonzero in any channel first.
        patch_size: training/prediction patch (D, H, W) voxels, or ``None`` (chosen at training).
        file_ending: NIfTI suffix of the input files.
        regions_class_order: with region labels, the label value each region's output paints, in
            ``regions`` order (later regions overwrite earlier ones), as nnU-Net's dataset.json.
    """

    target_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_names: tuple[str, ...] = ("image",)
    labels: dict[str, int | tuple[int, ...]] = field(default_factory=lambda: {"background": 0, "foreground": 1})
    normalization: str = "zscore"
    use_mask_for_norm: bool = False
    crop_to_nonzero: bool = True
    patch_size: tuple[int, int, int] | None = None
    file_ending: str = ".nii.gz"
    regions_class_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.target_spacing_mm = to_3tuple(self.target_spacing_mm, "target_spacing_mm (mm)", float)
        if not isinstance(self.channel_names, list | tuple):
            raise ValueError(f"channel_names: expected a list of channel names, got {self.channel_names!r}")
        self.channel_names = tuple(str(c) for c in self.channel_names)
        if not self.channel_names:
            raise ValueError("channel_names: need at least one input channel")
        problems = label_problems(self.labels, regions=True)
        if problems:
            raise ValueError(f"labels: {'; '.join(problems)} (nnU-Net's label rules)")
        labels: dict[str, int | tuple[int, ...]] = {}
        for k, v in self.labels.items():
            values = tuple(int(x) for x in v) if isinstance(v, list | tuple) else (int(v),)
            labels[str(k)] = values if len(values) > 1 else values[0]  # a list of one value is that label
        self.labels = labels
        if self.regions_class_order is not None:
            self.regions_class_order = tuple(int(c) for c in self.regions_class_order)  # type: ignore[assignment]
            if not self.has_regions:
                raise ValueError("regions_class_order is set, but no label is a region (a list of values)")
            values = {v for k, vs in self.labels.items() if k != "ignore"
                      for v in (vs if isinstance(vs, tuple) else (vs,))}
            unknown = [c for c in self.regions_class_order if c not in values or c == 0]
            if unknown:
                raise ValueError(f"regions_class_order: {unknown} are not foreground label values "
                                 f"{sorted(values - {0})}")
        if self.has_regions and (self.regions_class_order is None
                                 or len(self.regions_class_order) != len(self.regions)):
            raise ValueError(f"labels has {len(self.regions)} region(s) {self.regions}: regions_class_order "
                             f"needs one label value per region, got {self.regions_class_order}")
        self.file_ending = check_file_ending(self.file_ending)
        if self.normalization != "zscore":
            raise ValueError(f"normalization: only 'zscore' is supported, got {self.normalization!r}")
        if not isinstance(self.use_mask_for_norm, bool):
            raise ValueError(f"use_mask_for_norm: expected true or false, got {self.use_mask_for_norm!r} "
                             f"(PreprocessingSpec.from_dataset also takes 'auto')")
        if self.patch_size is not None:
            self.patch_size = to_3tuple(self.patch_size, "patch_size (voxels)")

    @property
    def has_regions(self) -> bool:
        """Whether a label is an nnU-Net region (a list of more than one value), as nnU-Net decides."""
        return any(isinstance(v, tuple) and len(v) > 1 for v in self.labels.values())

    @property
    def regions(self) -> list[tuple[int, ...]]:
        """Foreground regions in label order (not background, not ``ignore``); ``[]`` without regions."""
        if not self.has_regions:
            return []
        return [v if isinstance(v, tuple) else (v,) for k, v in self.labels.items()
                if k != "ignore" and set(v if isinstance(v, tuple) else (v,)) != {0}]

    @property
    def num_classes(self) -> int:
        """Network output channels: the largest label value + 1 (``ignore`` left out), or the number of regions."""
        if self.has_regions:
            return len(self.regions)
        return max(v for k, v in self.labels.items() if k != "ignore") + 1  # type: ignore[type-var]

    @classmethod
    def from_dataset(cls, ds: NnUNetDataset, **overrides: Any) -> PreprocessingSpec:
        """Spec with the dataset's channels, labels and file ending (1 mm isotropic by default).

        ``use_mask_for_norm="auto"`` decides it as nnU-Net's planner does (reads every image once,
        see :func:`nnunet_use_mask_for_norm`).

        Example:
            >>> spec = PreprocessingSpec.from_dataset(read_dataset_json("Dataset001_Brain"), use_mask_for_norm="auto")
        """
        kw: dict[str, Any] = dict(channel_names=ds.channel_names, labels=dict(ds.labels),
                                  file_ending=ds.file_ending)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if kw.get("use_mask_for_norm") == "auto":
            kw["use_mask_for_norm"] = nnunet_use_mask_for_norm(ds)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return to_jsonable_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessingSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        return from_dict_strict(cls, d)

    def to_json(self) -> str:
        """The spec as a JSON string."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PreprocessingSpec:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the spec as JSON (atomically), e.g. ``MODEL_DIR/preprocessing.json``."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PreprocessingSpec:
        """Read a spec written by :meth:`save`; errors name the file."""
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (a model directory needs preprocessing.json)"
                                    ) from None
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a valid PreprocessingSpec ({e})") from None

    def cache_key(self) -> str:
        """Short hash of the fields that change preprocessed arrays (not ``patch_size``)."""
        d = self.to_dict()
        d.pop("patch_size")
        d.pop("file_ending")
        if d.get("regions_class_order") is None:
            d.pop("regions_class_order")  # keeps the keys of caches written before regions existed
        d["_version"] = 2  # 2: resampling as nnunetv2 2.8.1 (range clip, label argmax, separate-axis rule)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


MASK_FOR_NORM_MAX_FRACTION = 0.75


def nnunet_use_mask_for_norm(ds: NnUNetDataset) -> bool:
    """nnU-Net's planner rule: z-score over the nonzero mask when cropping to it shrinks the data.

    True when, in the median case, the nonzero bounding box holds fewer than 3/4 of the voxels
    (``median_relative_size_after_cropping < 0.75`` in nnU-Net's experiment planner), as for
    skull-stripped brain MRI. Reads every case's channel files.

    Example:
        >>> nnunet_use_mask_for_norm(read_dataset_json("Dataset001_Brain"))
        True
    """
    fractions = []
    for case in ds.cases:
        image = np.stack([read_nifti(p)[0] for p in ds.image_paths(case)])
        box = crop_to_nonzero(image)[0].shape[1:]
        fractions.append(float(np.prod(box)) / float(np.prod(image.shape[1:])))
    if not fractions:
        raise ValueError(f"{ds.root}: no cases to decide use_mask_for_norm from")
    return bool(np.median(fractions) < MASK_FOR_NORM_MAX_FRACTION)


# ---- one case: forward and inverse ---------------------------------------------------------------
def _load_channels(image_paths: Sequence[str | os.PathLike[str]], spec: PreprocessingSpec):
    if len(image_paths) != len(spec.channel_names):
        raise ValueError(f"expected {len(spec.channel_names)} channel file(s) {spec.channel_names}, "
                         f"got {len(image_paths)}: {[str(p) for p in image_paths]}")
    arrays, header0 = [], None
    for p in image_paths:
        data, header = read_nifti(p)
        if data.ndim != 3:
            raise ValueError(f"{p}: expected a 3D volume, got shape {data.shape}")
        if header0 is None:
            header0 = header
        elif data.shape != header0.shape or not np.allclose(header.affine, header0.affine,
                                                            atol=AFFINE_ATOL_MM):
            raise ValueError(f"{p}: shape/affine differ from {header0.path.name} "
                             f"({data.shape} vs {header0.shape})")
        if not np.isfinite(data).all():
            raise ValueError(f"{p}: contains NaN or inf voxels")
        arrays.append(data)
    return np.stack(arrays), header0


def _preprocess(image: np.ndarray, seg: np.ndarray | None, header: Any, spec: PreprocessingSpec,
                paths: Sequence[Any], constant: str = "error") -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    original_shape = tuple(int(s) for s in image.shape[1:])
    if spec.crop_to_nonzero:
        image, seg, bbox = crop_to_nonzero(image, seg)
    else:
        bbox = tuple(slice(0, n) for n in original_shape)
    cropped_shape = tuple(int(s) for s in image.shape[1:])
    try:
        image = zscore(image, nonzero_mask(image) if spec.use_mask_for_norm else None, constant=constant)
    except ValueError as e:
        raise ValueError(f"{[str(p) for p in paths]}: {e}") from None
    # with constant="zero" exactly the constant channels are all 0 (a z-scored one has std 1)
    constant_channels = [c for c in range(image.shape[0]) if constant == "zero" and not image[c].any()]
    new_shape = shape_for_spacing(cropped_shape, header.spacing_mm, spec.target_spacing_mm)
    axis = anisotropic_axis(header.spacing_mm, spec.target_spacing_mm)
    image = resample_image(image, new_shape, order=3, separate_axis=axis)
    if seg is not None:
        seg = resample_seg(seg, new_shape, separate_axis=axis)
    props = {
        "files": [str(p) for p in paths],
        "original_shape": list(original_shape),
        "original_spacing_mm": list(header.spacing_mm),
        "original_affine": np.asarray(header.affine).tolist(),
        "bbox": [[int(s.start), int(s.stop)] for s in bbox],
        "cropped_shape": list(cropped_shape),
        "shape": [int(s) for s in new_shape],
        "spacing_mm": list(spec.target_spacing_mm),
        "separate_axis": axis,
        "constant_channels": constant_channels,
    }
    return image.astype(np.float32, copy=False), seg, props


def preprocess_case(
    image_paths: Sequence[str | os.PathLike[str]], spec: PreprocessingSpec, constant_channels: str = "error"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one case's channel files and bring them into the network's space.

    Steps: stack channels (C, D, H, W) -> crop to nonzero -> z-score per channel -> resample to
    ``spec.target_spacing_mm`` (third-order splines; nnU-Net's separate thick axis when anisotropic),
    as nnunetv2's ``DefaultPreprocessor`` with ``preprocess_like_nnssl`` plans.

    Args:
        image_paths: one NIfTI file per channel, in ``spec.channel_names`` order; equal shapes/affines.
        spec: the preprocessing to apply.
        constant_channels: a channel constant over the crop: ``"error"`` (ValueError) or ``"zero"``
            (set to 0, as ``s3d predict`` does; see :func:`s3d.data.preprocess.zscore`).

    Returns:
        ``(array, properties)``: array (C, D', H', W') float32; properties (JSON-able dict) holding
        the original shape, spacing (mm), affine, the crop bbox and resampled shape, for
        :func:`restore_geometry`, and ``constant_channels`` (indices of the channels found constant).

    Example:
        >>> x, props = preprocess_case(["case_0000.nii.gz", "case_0001.nii.gz"], spec)
        >>> x.shape, props["original_shape"]
        ((2, 40, 48, 44), [48, 52, 40])
    """
    image, header = _load_channels(image_paths, spec)
    data, _, props = _preprocess(image, None, header, spec, image_paths, constant_channels)
    return data, props


def preprocess_training_case(
    image_paths: Sequence[str | os.PathLike[str]], label_path: str | os.PathLike[str], spec: PreprocessingSpec
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """As :func:`preprocess_case`, plus the label map (cropped alike, resampled per label).

    Returns:
        ``(array (C, D', H', W') float32, seg (D', H', W') int16, properties)``.

    Example:
        >>> x, seg, props = preprocess_training_case(["c_0000.nii.gz"], "c.nii.gz", spec)
    """
    image, header = _load_channels(image_paths, spec)
    seg, seg_header = read_nifti(label_path, dtype=np.float64)
    if seg.shape != image.shape[1:]:
        raise ValueError(f"{label_path}: shape {seg.shape} differs from the image's {image.shape[1:]}")
    seg = np.rint(seg).astype(np.int16)
    data, seg_out, props = _preprocess(image, seg, header, spec, [*image_paths, label_path])
    assert seg_out is not None  # a label map in, a label map out
    return data, seg_out, props


def restore_geometry(array: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """Map a prediction in preprocessed space back onto the case's original voxel grid.

    Undoes the resampling (probabilities: linear per channel; labels: per-label linear, largest
    wins) and the crop (outside the crop: background, i.e. probability 1 for class 0, label 0).

    Args:
        array: probabilities (K, D', H', W') float, or labels (D', H', W') integer, in the space of
            :func:`preprocess_case` (shape ``properties["shape"]``).
        properties: the dict returned by :func:`preprocess_case`.

    Returns:
        (K, D, H, W) float32 probabilities or (D, H, W) labels with ``properties["original_shape"]``.

    Example:
        >>> x, props = preprocess_case(paths, spec)
        >>> labels = restore_geometry(net_labels, props)      # same shape as the input NIfTI
    """
    shape = tuple(properties["shape"])
    cropped = tuple(properties["cropped_shape"])
    original = tuple(properties["original_shape"])
    bbox = tuple(slice(a, b) for a, b in properties["bbox"])
    axis = properties.get("separate_axis")
    if array.ndim == 4:
        if tuple(array.shape[1:]) != shape:
            raise ValueError(f"probabilities: expected (K, {', '.join(map(str, shape))}), got {array.shape}")
        probs = resample_image(array.astype(np.float32, copy=False), cropped, order=1, separate_axis=axis)
        out = np.zeros((array.shape[0], *original), dtype=np.float32)
        out[0] = 1.0
        out[(slice(None), *bbox)] = probs
        return out
    if array.ndim == 3:
        if tuple(array.shape) != shape:
            raise ValueError(f"labels: expected shape {shape}, got {array.shape}")
        labels = resample_seg(array, cropped, separate_axis=axis)
        out = np.zeros(original, dtype=array.dtype)
        out[bbox] = labels
        return out
    raise ValueError(f"expected probabilities (K, D, H, W) or labels (D, H, W), got shape {array.shape}")

