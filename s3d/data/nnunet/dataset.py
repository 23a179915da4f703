"""nnU-Net v2 raw datasets: reading ``dataset.json`` and checking a dataset (every problem at once).

Layout read here (nnU-Net v2 "raw" format)::

    DATASET/dataset.json           {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0,
                                    "tumour": 1}, "numTraining": 12, "file_ending": ".nii.gz"}
    DATASET/imagesTr/{case}_{XXXX}.nii.gz   one file per channel XXXX = 0000, 0001, ...
    DATASET/labelsTr/{case}.nii.gz
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s3d._optional import optional_import
from s3d._paths import check_file_ending
from s3d.data.io import read_header, read_nifti
from s3d.data.labels import label_problems
from s3d.data.preprocess import shape_for_spacing

#: Affines of image channels and label may differ by this much (mm) and still count as equal.
AFFINE_ATOL_MM = 1e-3


class DatasetError(ValueError):
    """An nnU-Net dataset with problems; ``.problems`` lists every one (each names its file)."""

    def __init__(self, root: str | os.PathLike[str], problems: Sequence[str]) -> None:
        self.root = Path(root)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.root}: {len(self.problems)} problem(s) in the nnU-Net dataset:\n{lines}")


# ---- dataset.json --------------------------------------------------------------------------------
@dataclass
class NnUNetDataset:
    """An nnU-Net v2 raw dataset on disk.

    Attributes:
        root: the dataset folder (holding ``dataset.json``).
        channel_names: channel names in channel order (``"0000"``, ``"0001"``, ... file suffixes).
        labels: label name -> integer value (``background`` = 0 included); checked with nnU-Net's rules
            (:func:`s3d.data.labels.check_labels`: consecutive from 0, ``ignore`` the highest).
        num_training: ``numTraining`` from dataset.json.
        file_ending: e.g. ``".nii.gz"``.
        cases: case identifiers found in ``labelsTr`` (sorted).
        shapes: voxel shape of each case's label map (filled by :func:`validate_dataset`).
        spacings_mm: voxel spacing of each case's label map, mm (filled by :func:`validate_dataset`).
    """

    root: Path
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    cases: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    spacings_mm: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        """Number of image channels (modalities)."""
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Output channels a network needs: one per label value, ``ignore`` left out (nnU-Net's rule)."""
        return max(v for k, v in self.labels.items() if k != "ignore") + 1

    @property
    def ignore_label(self) -> int | None:
        """The ``ignore`` label's value (voxels without annotation), or ``None``."""
        return self.labels.get("ignore")

    def image_paths(self, case: str) -> list[Path]:
        """Paths of the channel files of ``case``: ``imagesTr/{case}_{XXXX}{file_ending}``."""
        images = self.root / "imagesTr"
        return [images / f"{case}_{c:04d}{self.file_ending}" for c in range(self.num_channels)]

    def label_path(self, case: str) -> Path:
        """Path of the label map of ``case``: ``labelsTr/{case}{file_ending}``."""
        return self.root / "labelsTr" / f"{case}{self.file_ending}"


def read_dataset_json(root: str | os.PathLike[str]) -> NnUNetDataset:
    """Read ``root/dataset.json`` and list the cases in ``labelsTr``.

    Raises:
        DatasetError: the folder or file is missing, not JSON, or lacks/garbles ``channel_names``,
            ``labels`` (nnU-Net's rules, :mod:`s3d.data.labels`), ``numTraining`` or ``file_ending``
            (every such problem is listed).

    Example:
        >>> ds = read_dataset_json("Dataset001_Brain")
        >>> ds.channel_names, ds.labels, ds.cases[:2]
        (('T1', 'T2'), {'background': 0, 'tumour': 1}, ['brain_000', 'brain_001'])
    """
    root = Path(root)
    path = root / "dataset.json"
    if root.exists() and not root.is_dir():
        raise DatasetError(root, [f"{root}: a file, not a dataset folder; pass the folder that holds dataset.json, "
                                  "imagesTr and labelsTr"])
    if not root.exists():
        raise DatasetError(root, [f"{root}: no such dataset folder"])
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "missing"
        raise DatasetError(root, [f"{path}: {what} (an nnU-Net v2 raw dataset needs dataset.json)"])
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(root, [f"{path}: not valid JSON ({e})"]) from None
    except OSError as e:
        raise DatasetError(root, [f"{path}: cannot read ({e.strerror or e})"]) from None
    if not isinstance(meta, dict):
        raise DatasetError(root, [f"{path}: expected a JSON object with channel_names, labels, numTraining and "
                                  f"file_ending; found a {type(meta).__name__}"])
    required = ("channel_names", "labels", "numTraining", "file_ending")
    problems = [f"{path}: missing key {k!r}" for k in required if k not in meta]
    channels: tuple[str, ...] = ()
    if isinstance(meta.get("channel_names"), dict):
        try:
            order = sorted(meta["channel_names"], key=int)
            if [int(k) for k in order] != list(range(len(order))):
                problems.append(f"{path}: channel_names keys must be 0..N-1, got {order}")
            channels = tuple(str(meta["channel_names"][k]) for k in order)
            if not channels:
                problems.append(f"{path}: channel_names is empty; list the input channels, e.g. {{\"0\": \"T1\"}}")
        except ValueError:
            problems.append(f"{path}: channel_names keys must be integers, got {list(meta['channel_names'])}")
    elif "channel_names" in meta:
        problems.append(f"{path}: channel_names must be a dict {{'0': name, ...}}")
    labels: dict[str, int] = {}
    if "labels" in meta:
        found = label_problems(meta["labels"], regions=False)
        problems.extend(f"{path}: {p} (nnU-Net's label rules)" for p in found)
        if not found:
            labels = {str(k): int(v) for k, v in meta["labels"].items()}
    file_ending = meta.get("file_ending", ".nii.gz")
    try:
        file_ending = check_file_ending(file_ending, path)
    except ValueError as e:
        problems.append(str(e))
    num_training = meta.get("numTraining", 0)
    if not isinstance(num_training, int) or isinstance(num_training, bool):
        problems.append(f"{path}: numTraining must be an int, got {num_training!r}")
        num_training = 0
    if problems:
        raise DatasetError(root, problems)
    labels_dir = root / "labelsTr"
    cases = sorted(p.name[: -len(file_ending)] for p in labels_dir.glob(f"*{file_ending}")
                   if not p.name.startswith(".")) if labels_dir.is_dir() else []
    return NnUNetDataset(root, channels, labels, num_training, file_ending, cases)


def validate_dataset(
    root: str | os.PathLike[str], check_voxels: bool = True, skip_voxels_for: Collection[str] = (), *,
    target_spacing_mm: Sequence[float] | None = None, min_shape: Sequence[int] | None = None,
) -> NnUNetDataset:
    """Check a dataset and raise one :class:`DatasetError` listing every problem with its file.

    Checks: dataset.json; ``labelsTr``/``imagesTr`` exist; ``numTraining`` equals the number of
    label files; every case has all channel files; images without a label; every file is a 3D
    volume (not 2D, not 1 voxel thick along an axis); channel/label shapes and affines agree (within
    1e-3 mm); with ``min_shape`` and ``target_spacing_mm``, every case resampled to the target spacing
    (shape computed from the header, no voxel read) has at least ``min_shape`` voxels per axis (e.g.
    the network's total stride); with ``check_voxels``, label values are in ``labels`` and images
    hold no NaN/inf (reading every voxel, except for the cases in ``skip_voxels_for``, e.g. those
    already preprocessed into the cache).

    Args:
        root: the dataset folder.
        check_voxels: read voxels (label values, NaN/inf).
        skip_voxels_for: cases whose voxels need no reading.
        target_spacing_mm: the spacing (mm) the cases will be resampled to (with ``min_shape``).
        min_shape: fewest voxels per axis (D, H, W) after resampling.

    Returns:
        The dataset (as :func:`read_dataset_json`, with ``shapes`` and ``spacings_mm`` filled) when
        there is no problem.

    Example:
        >>> ds = validate_dataset("Dataset001_Brain", target_spacing_mm=(1, 1, 1), min_shape=(32, 32, 32))
    """
    optional_import("nibabel", "reading NIfTI")  # one line, not one problem per file
    ds = read_dataset_json(root)
    root = ds.root
    problems: list[str] = []
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            problems.append(f"{root / sub}: missing folder")
    if problems:
        raise DatasetError(root, problems)
    if ds.num_training != len(ds.cases):
        problems.append(f"{root / 'dataset.json'}: numTraining is {ds.num_training} but labelsTr holds "
                        f"{len(ds.cases)} label file(s)")
    if not ds.cases:
        problems.append(f"{root / 'labelsTr'}: no label files ending in {ds.file_ending}")
    known = set(ds.cases)
    other = ".nii" if ds.file_ending == ".nii.gz" else ".nii.gz"
    for sub in ("imagesTr", "labelsTr"):
        for p in sorted((root / sub).iterdir()):
            if not p.name.startswith(".") and p.name.endswith(other) and not p.name.endswith(ds.file_ending):
                problems.append(f"{p}: ends in {other}, but dataset.json's file_ending is {ds.file_ending}; "
                                f"convert it (or set file_ending) so that every file has one ending")
    for p in sorted((root / "imagesTr").glob(f"*{ds.file_ending}")):
        if p.name.startswith("."):  # hidden: .DS_Store, ._name (macOS), editors' backups
            continue
        stem = p.name[: -len(ds.file_ending)]
        case, _, idx = stem.rpartition("_")
        if not (len(idx) == 4 and idx.isdigit()):
            problems.append(f"{p}: name must end in _XXXX (channel index), e.g. {stem}_0000{ds.file_ending}")
        elif case not in known:
            problems.append(f"{p}: image without label file {ds.label_path(case)}")
        elif int(idx) >= ds.num_channels:
            problems.append(f"{p}: channel {int(idx)} but dataset.json lists {ds.num_channels} channel(s)")
    allowed = set(ds.labels.values())
    skip = set(skip_voxels_for)
    size_rule = None
    if min_shape is not None and target_spacing_mm is not None:
        size_rule = (tuple(float(t) for t in target_spacing_mm), tuple(int(m) for m in min_shape))
    for case in ds.cases:
        problems.extend(_case_problems(ds, case, allowed, check_voxels and case not in skip, size_rule))
    if problems:
        raise DatasetError(root, problems)
    return ds


def _shape_problems(path: os.PathLike[str], shape: tuple[int, ...], spacing: Sequence[float],
                    size_rule: tuple[tuple[float, ...], tuple[int, ...]] | None) -> list[str]:
    """A file that is not a 3D volume, or too small for the network after resampling."""
    if len(shape) != 3:
        return [f"{path}: shape {shape} is {len(shape)}D; s3d finetune trains 3D networks on 3D volumes "
                "(one 3D file per channel)"]
    thin = [a for a, n in enumerate(shape) if n == 1]
    if thin:
        return [f"{path}: shape {shape} is 1 voxel thick along axis {thin[0]} (D, H, W): a 2D slice, not a "
                "3D volume; s3d finetune needs at least 2 voxels along every axis"]
    if size_rule is None:
        return []
    target, need = size_rule
    new = shape_for_spacing(shape, spacing, target)
    small = [a for a in range(3) if new[a] < need[a]]
    if not small:
        return []
    a = small[0]
    return [f"{path}: {shape} voxels at {tuple(round(s, 4) for s in spacing)} mm become {new} at the target "
            f"spacing {target} mm, {new[a]} < {need[a]} voxels along axis {a} (the network's total stride); "
            "use a finer --spacing or leave the case out"]


def _case_problems(ds: NnUNetDataset, case: str, allowed: set[int], check_voxels: bool,
                   size_rule: tuple[tuple[float, ...], tuple[int, ...]] | None = None) -> list[str]:
    problems = []
    lab_path = ds.label_path(case)
    try:
        lab = read_header(lab_path)
    except (OSError, ValueError) as e:
        return [str(e)]
    shape_problems = _shape_problems(lab_path, lab.shape, lab.spacing_mm, size_rule)
    if shape_problems:
        return shape_problems  # the rest (voxels, channel agreement) cannot be trained on anyway
    ds.shapes[case] = tuple(lab.shape)
    ds.spacings_mm[case] = lab.spacing_mm
    for p in ds.image_paths(case):
        if not p.is_file():
            problems.append(f"{p}: missing channel file of case {case!r}")
            continue
        try:
            img = read_header(p)
        except (OSError, ValueError) as e:
            problems.append(str(e))
            continue
        if img.shape[:3] != lab.shape[:3] or len(img.shape) != 3:
            problems.append(f"{p}: shape {img.shape} differs from label {lab_path.name} shape {lab.shape} "
                            "(expected one 3D volume per channel file)")
        elif not np.allclose(img.affine, lab.affine, atol=AFFINE_ATOL_MM):
            problems.append(f"{p}: affine differs from label {lab_path.name} "
                            f"(max difference {np.abs(img.affine - lab.affine).max():.4g})")
        if check_voxels:
            try:
                data, _ = read_nifti(p)
            except ValueError as e:
                problems.append(str(e))
                continue
            n_bad = int((~np.isfinite(data)).sum())
            if n_bad:
                problems.append(f"{p}: {n_bad} NaN/inf voxel(s)")
    if check_voxels:
        try:
            seg, _ = read_nifti(lab_path, dtype=np.float64)
        except ValueError as e:
            return problems + [str(e)]
        values = np.unique(seg)
        bad = [int(v) if v == int(v) else v for v in values.tolist() if v != int(v) or int(v) not in allowed]
        if bad:
            problems.append(f"{lab_path}: label value(s) {bad[:10]} not in dataset.json labels "
                            f"{sorted(allowed)}")
    return problems
