"""nnU-Net v2 raw datasets in: ``dataset.json``, validation, preprocessing with its inverse, a disk cache.

Layout read here (nnU-Net v2 "raw" format)::

    DATASET/dataset.json           {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0,
                                    "tumour": 1}, "numTraining": 12, "file_ending": ".nii.gz"}
    DATASET/imagesTr/{case}_{XXXX}.nii.gz   one file per channel XXXX = 0000, 0001, ...
    DATASET/labelsTr/{case}.nii.gz

Preprocessing follows the paper's pre-training: crop to the nonzero bounding box, z-score per
channel, resample to the target spacing (1 mm isotropic by default). :func:`preprocess_case` maps a
raw case into that space and returns the ``properties`` that :func:`restore_geometry` needs to map
a prediction back onto the original voxel grid. :func:`preprocess_dataset` caches every case as
``.npy`` arrays plus a properties JSON in ``DATASET/.s3d_cache/<spec-hash>/`` (atomic writes), so a
second run reads the cache instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s3d._dataclasses import from_dict_strict, to_jsonable_dict
from s3d._fs import atomic_path, write_json_atomic
from s3d.data.io import read_header, read_nifti
from s3d.data.preprocess import (
    anisotropic_axis,
    crop_to_nonzero,
    resample_image,
    resample_seg,
    shape_for_spacing,
    zscore,
)

CACHE_DIR_NAME = ".s3d_cache"
#: Foreground voxel coordinates kept per label in the cache (for foreground oversampling).
MAX_LOCATIONS_PER_LABEL = 10_000
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
        labels: label name -> integer value (``background`` = 0 included).
        num_training: ``numTraining`` from dataset.json.
        file_ending: e.g. ``".nii.gz"``.
        cases: case identifiers found in ``labelsTr`` (sorted).
    """

    root: Path
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    cases: list[str] = field(default_factory=list)

    @property
    def num_channels(self) -> int:
        """Number of image channels (modalities)."""
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Output channels a network needs: the largest label value + 1."""
        return max(self.labels.values()) + 1

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
        DatasetError: the file is missing, not JSON, or lacks/garbles ``channel_names``, ``labels``,
            ``numTraining`` or ``file_ending`` (every such problem is listed).

    Example:
        >>> ds = read_dataset_json("Dataset001_Brain")
        >>> ds.channel_names, ds.labels, ds.cases[:2]
        (('T1', 'T2'), {'background': 0, 'tumour': 1}, ['brain_000', 'brain_001'])
    """
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(root, [f"{path}: missing (an nnU-Net v2 raw dataset needs dataset.json)"])
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(root, [f"{path}: not valid JSON ({e})"]) from None
    required = ("channel_names", "labels", "numTraining", "file_ending")
    problems = [f"{path}: missing key {k!r}" for k in required if k not in meta]
    channels: tuple[str, ...] = ()
    if isinstance(meta.get("channel_names"), dict):
        try:
            order = sorted(meta["channel_names"], key=int)
            if [int(k) for k in order] != list(range(len(order))):
                problems.append(f"{path}: channel_names keys must be 0..N-1, got {order}")
            channels = tuple(str(meta["channel_names"][k]) for k in order)
        except ValueError:
            problems.append(f"{path}: channel_names keys must be integers, got {list(meta['channel_names'])}")
    elif "channel_names" in meta:
        problems.append(f"{path}: channel_names must be a dict {{'0': name, ...}}")
    labels: dict[str, int] = {}
    if isinstance(meta.get("labels"), dict):
        for name, value in meta["labels"].items():
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                labels[str(name)] = value
            else:
                problems.append(f"{path}: label {name!r} must be a non-negative int, got {value!r} "
                                "(region-based labels are not supported)")
        if labels and 0 not in labels.values():
            problems.append(f"{path}: labels must include background = 0")
    elif "labels" in meta:
        problems.append(f"{path}: labels must be a dict {{name: value}}")
    file_ending = str(meta.get("file_ending", ".nii.gz"))
    if file_ending not in (".nii.gz", ".nii"):
        problems.append(f"{path}: file_ending {file_ending!r} is not supported (use .nii.gz or .nii)")
    num_training = meta.get("numTraining", 0)
    if not isinstance(num_training, int):
        problems.append(f"{path}: numTraining must be an int, got {num_training!r}")
        num_training = 0
    if problems:
        raise DatasetError(root, problems)
    labels_dir = root / "labelsTr"
    cases = sorted(p.name[: -len(file_ending)] for p in labels_dir.glob(f"*{file_ending}")
                   if not p.name.startswith(".")) if labels_dir.is_dir() else []
    return NnUNetDataset(root, channels, labels, num_training, file_ending, cases)


def validate_dataset(
    root: str | os.PathLike[str], check_voxels: bool = True, skip_voxels_for: Collection[str] = ()
) -> NnUNetDataset:
    """Check a dataset and raise one :class:`DatasetError` listing every problem with its file.

    Checks: dataset.json; ``labelsTr``/``imagesTr`` exist; ``numTraining`` equals the number of
    label files; every case has all channel files; images without a label; channel/label shapes
    and affines agree (within 1e-3 mm); with ``check_voxels``, label values are in ``labels`` and
    images hold no NaN/inf (reading every voxel, except for the cases in ``skip_voxels_for``, e.g.
    those already preprocessed into the cache).

    Returns:
        The dataset (as :func:`read_dataset_json`) when there is no problem.

    Example:
        >>> ds = validate_dataset("Dataset001_Brain")   # raises DatasetError listing all problems
    """
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
    for p in sorted((root / "imagesTr").glob(f"*{ds.file_ending}")):
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
    for case in ds.cases:
        problems.extend(_case_problems(ds, case, allowed, check_voxels and case not in skip))
    if problems:
        raise DatasetError(root, problems)
    return ds


def _case_problems(ds: NnUNetDataset, case: str, allowed: set[int], check_voxels: bool) -> list[str]:
    problems = []
    lab_path = ds.label_path(case)
    try:
        lab = read_header(lab_path)
    except (OSError, ValueError) as e:
        return [str(e)]
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


# ---- preprocessing spec --------------------------------------------------------------------------
@dataclass
class PreprocessingSpec:
    """How raw images become network input; saved as ``preprocessing.json`` next to a model.

    Attributes:
        target_spacing_mm: voxel spacing after resampling, mm per voxel along (D, H, W).
        channel_names: input channels in order (``imagesTr/{case}_0000`` is the first).
        labels: label name -> value, as in dataset.json.
        normalization: ``"zscore"`` (per channel, over the cropped image).
        crop_to_nonzero: crop to the bounding box of voxels nonzero in any channel first.
        patch_size: training/prediction patch (D, H, W) voxels, or ``None`` (chosen at training).
        file_ending: NIfTI suffix of the input files.
    """

    target_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_names: tuple[str, ...] = ("image",)
    labels: dict[str, int] = field(default_factory=lambda: {"background": 0, "foreground": 1})
    normalization: str = "zscore"
    crop_to_nonzero: bool = True
    patch_size: tuple[int, int, int] | None = None
    file_ending: str = ".nii.gz"

    def __post_init__(self) -> None:
        self.target_spacing_mm = tuple(float(s) for s in self.target_spacing_mm)  # type: ignore[assignment]
        if len(self.target_spacing_mm) != 3 or min(self.target_spacing_mm) <= 0:
            raise ValueError(f"target_spacing_mm: expected 3 positive numbers (mm), "
                             f"got {self.target_spacing_mm}")
        self.channel_names = tuple(str(c) for c in self.channel_names)
        if not self.channel_names:
            raise ValueError("channel_names: need at least one input channel")
        self.labels = {str(k): int(v) for k, v in self.labels.items()}
        if self.normalization != "zscore":
            raise ValueError(f"normalization: only 'zscore' is supported, got {self.normalization!r}")
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
            if len(self.patch_size) != 3 or min(self.patch_size) < 1:
                raise ValueError(f"patch_size: expected 3 positive ints (voxels), got {self.patch_size}")

    @property
    def num_classes(self) -> int:
        """Network output channels: the largest label value + 1."""
        return max(self.labels.values()) + 1

    @classmethod
    def from_dataset(cls, ds: NnUNetDataset, **overrides: Any) -> PreprocessingSpec:
        """Spec with the dataset's channels, labels and file ending (1 mm isotropic by default)."""
        kw: dict[str, Any] = dict(channel_names=ds.channel_names, labels=dict(ds.labels),
                                  file_ending=ds.file_ending)
        kw.update({k: v for k, v in overrides.items() if v is not None})
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
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid PreprocessingSpec ({e})") from e

    def cache_key(self) -> str:
        """Short hash of the fields that change preprocessed arrays (not ``patch_size``)."""
        d = self.to_dict()
        d.pop("patch_size")
        d.pop("file_ending")
        d["_version"] = 1
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


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
                paths: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    original_shape = tuple(int(s) for s in image.shape[1:])
    if spec.crop_to_nonzero:
        image, seg, bbox = crop_to_nonzero(image, seg)
    else:
        bbox = tuple(slice(0, n) for n in original_shape)
    cropped_shape = tuple(int(s) for s in image.shape[1:])
    try:
        image = zscore(image)
    except ValueError as e:
        raise ValueError(f"{[str(p) for p in paths]}: {e}") from None
    new_shape = shape_for_spacing(cropped_shape, header.spacing_mm, spec.target_spacing_mm)
    axis = anisotropic_axis(header.spacing_mm)
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
    }
    return image.astype(np.float32, copy=False), seg, props


def preprocess_case(
    image_paths: Sequence[str | os.PathLike[str]], spec: PreprocessingSpec
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one case's channel files and bring them into the network's space.

    Steps: stack channels (C, D, H, W) -> crop to nonzero -> z-score per channel -> resample to
    ``spec.target_spacing_mm`` (third-order splines; nnU-Net's separate thick axis when anisotropic).

    Args:
        image_paths: one NIfTI file per channel, in ``spec.channel_names`` order; equal shapes/affines.
        spec: the preprocessing to apply.

    Returns:
        ``(array, properties)``: array (C, D', H', W') float32; properties (JSON-able dict) holding
        the original shape, spacing (mm), affine, the crop bbox and resampled shape, for
        :func:`restore_geometry`.

    Example:
        >>> x, props = preprocess_case(["case_0000.nii.gz", "case_0001.nii.gz"], spec)
        >>> x.shape, props["original_shape"]
        ((2, 40, 48, 44), [48, 52, 40])
    """
    image, header = _load_channels(image_paths, spec)
    data, _, props = _preprocess(image, None, header, spec, image_paths)
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
    data, seg, props = _preprocess(image, seg, header, spec, [*image_paths, label_path])
    return data, seg, props  # type: ignore[return-value]


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


# ---- the on-disk cache ---------------------------------------------------------------------------
def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _foreground_locations(seg: np.ndarray, seed: int = 1234) -> np.ndarray:
    """(N, 4) int32 rows (label, d, h, w): up to MAX_LOCATIONS_PER_LABEL voxels per foreground label."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in np.unique(seg):
        if v == 0:
            continue
        idx = np.argwhere(seg == v)
        if len(idx) > MAX_LOCATIONS_PER_LABEL:
            idx = idx[rng.choice(len(idx), MAX_LOCATIONS_PER_LABEL, replace=False)]
        rows.append(np.concatenate([np.full((len(idx), 1), v), idx], axis=1))
    return (np.concatenate(rows) if rows else np.zeros((0, 4))).astype(np.int32)


def cache_dir_for(root: str | os.PathLike[str], spec: PreprocessingSpec) -> Path:
    """``root/.s3d_cache/<spec hash>``: where :func:`preprocess_dataset` puts its arrays."""
    return Path(root) / CACHE_DIR_NAME / spec.cache_key()


def preprocess_dataset(
    ds: NnUNetDataset, spec: PreprocessingSpec, cases: Sequence[str] | None = None, progress: bool = True
) -> Path:
    """Preprocess every case once into the cache; cases already there are skipped.

    A case is redone when its source files changed (size or modification time).
    Per case: ``{case}_data.npy`` (C, D, H, W) float32, ``{case}_seg.npy`` (D, H, W) int16,
    ``{case}_locs.npy`` (N, 4) foreground locations, then ``{case}.json`` (properties) written
    last, all atomically: a case counts as cached only when its JSON exists.

    Returns:
        The cache folder (:func:`cache_dir_for`).

    Example:
        >>> cache = preprocess_dataset(validate_dataset("Dataset001_Brain"), spec)
        >>> data, seg, props, locs = load_cached_case(cache, "brain_000")
    """
    from tqdm.auto import tqdm

    out = cache_dir_for(ds.root, spec)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    if not spec_path.exists():
        write_json_atomic(spec_path, spec.to_dict())
    todo = [c for c in (ds.cases if cases is None else cases) if not _is_cached(out, ds, c)]
    for case in tqdm(todo, desc="preprocess", disable=not progress or not todo, unit="case"):
        data, seg, props = preprocess_training_case(ds.image_paths(case), ds.label_path(case), spec)
        props["source_stat"] = _source_stat(ds, case)
        _save_npy(out / f"{case}_data.npy", data)
        _save_npy(out / f"{case}_seg.npy", seg)
        _save_npy(out / f"{case}_locs.npy", _foreground_locations(seg))
        write_json_atomic(out / f"{case}.json", props)
    return out


def _source_stat(ds: NnUNetDataset, case: str) -> list[list[int]]:
    stats = [p.stat() for p in [*ds.image_paths(case), ds.label_path(case)]]
    return [[int(st.st_size), int(st.st_mtime_ns)] for st in stats]


def _is_cached(cache: Path, ds: NnUNetDataset, case: str) -> bool:
    jpath = cache / f"{case}.json"
    if not jpath.exists():
        return False
    try:
        return json.loads(jpath.read_text(encoding="utf-8")).get("source_stat") == _source_stat(ds, case)
    except (json.JSONDecodeError, OSError):
        return False


def cached_cases(ds: NnUNetDataset, spec: PreprocessingSpec) -> list[str]:
    """Cases of ``ds`` whose cache entry for ``spec`` exists and matches the current source files."""
    cache = cache_dir_for(ds.root, spec)
    return [c for c in ds.cases if _is_cached(cache, ds, c)] if cache.is_dir() else []


def load_cached_case(
    cache_dir: str | os.PathLike[str], case: str, mmap: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray]:
    """Read a case written by :func:`preprocess_dataset`: (data, seg, properties, fg locations).

    With ``mmap`` the arrays are memory-mapped (read-only), so patches read only what they touch.
    """
    cache_dir = Path(cache_dir)
    jpath = cache_dir / f"{case}.json"
    if not jpath.exists():
        raise FileNotFoundError(f"{jpath}: case {case!r} is not in the cache; run preprocess_dataset first")
    props = json.loads(jpath.read_text(encoding="utf-8"))
    mode = "r" if mmap else None
    data = np.load(cache_dir / f"{case}_data.npy", mmap_mode=mode)
    seg = np.load(cache_dir / f"{case}_seg.npy", mmap_mode=mode)
    locs = np.load(cache_dir / f"{case}_locs.npy")
    return data, seg, props, locs
