"""Synthetic cohorts on disk: labelled nnU-Net v2 raw datasets and folders of unlabelled volumes.

Case i of a split is seeded by ``(seed, split, i)``, so adding cases never changes the existing ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from s3d._fs import write_json_atomic
from s3d.data.io import write_nifti
from s3d.data.synthetic.anatomy import LESION_LABELS, TASKS, TISSUE_LABELS, make_subject
from s3d.data.synthetic.factors import AnatomyRanges, ImageRanges, seeded_rng
from s3d.data.synthetic.render import CONTRASTS, render_image

TASK_CHANNELS = {"tissue": ("T1",), "lesion": ("FLAIR", "T1")}
TASK_DATASET = {"tissue": (900, "DemoTissue"), "lesion": (901, "DemoLesion")}

#: Seed stream of each split: case i of split s is seeded by (seed, SPLIT_CODE[s], i), so the splits never
#: share a subject. "val" is for choosing settings (held out from both training and test cases).
SPLIT_CODE = {"train": 1, "test": 2, "unlabelled": 3, "val": 4}
#: How often each sequence appears among unlabelled volumes (a T1-heavy archive, as real ones are).
UNLABELLED_CONTRASTS = {"T1": 0.4, "T2": 0.2, "FLAIR": 0.2, "PD": 0.2}
_MNI_COPYRIGHT = (
    "Anatomy derived from the MNI ICBM152 non-linear symmetric 2009a template, Copyright (C) 1993-2009 "
    "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University "
    "(redistributed in the nilearn package)."
)


@dataclass
class DemoCohort:
    """Where :func:`write_demo_cohort` wrote things.

    Attributes:
        dataset_dir: the nnU-Net raw dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``,
            ``imagesTs``, ``labelsTs``).
        unlabelled_dir: folder of unlabelled NIfTI volumes for pre-training (or None).
        train_cases / test_cases / unlabelled_files: what was written.
    """

    dataset_dir: Path
    unlabelled_dir: Path | None
    train_cases: list[str]
    test_cases: list[str]
    unlabelled_files: list[Path]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Generate with one torch thread: the tensors are small, and on a busy machine 2 threads were 5-15x
    slower than one (measured: 0.45-1.5 s vs 0.09 s per 48x56x48 subject on 2 shared cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def case_seed(seed: int, split: str, index: int) -> list[int]:
    """The seed of case ``index`` of ``split`` ("train", "test", "val", "unlabelled") in cohort ``seed``.

    Example:
        >>> case_seed(0, "test", 3)
        [0, 2, 3]
    """
    return [int(seed), SPLIT_CODE[split], int(index)]


def write_demo_dataset(
    out_dir: str | os.PathLike[str],
    *,
    task: str = "tissue",
    source: str = "phantom",
    num_train: int = 20,
    num_test: int = 10,
    shape: Sequence[int] = (80, 96, 80),
    spacing_mm: float | Sequence[float] = 2.0,
    seed: int = 0,
    test_split: str = "test",
    anatomy: AnatomyRanges | None = None,
    imaging: ImageRanges | None = None,
    progress: bool = True,
) -> tuple[list[str], list[str]]:
    """Write a labelled demo dataset in nnU-Net v2 raw format into ``out_dir``.

    Layout: ``dataset.json`` (channel_names, labels, numTraining, file_ending), ``imagesTr/{case}_{c:04d}
    .nii.gz``, ``labelsTr/{case}.nii.gz``, ``imagesTs/{case}_{c:04d}.nii.gz`` and, for evaluation
    (nnU-Net ignores it), ``labelsTs/{case}.nii.gz``.

    Args:
        out_dir: dataset folder, e.g. ``.../Dataset900_DemoTissue``; created if needed.
        task: "tissue" (labels 0 bg, 1 CSF, 2 GM, 3 WM; channel T1) or "lesion" (0 bg, 1 lesion;
            channels FLAIR, T1; 2-10 lesions per subject).
        source: "phantom" or "mni" (see :func:`make_subject`).
        num_train: number of labelled training cases.
        num_test: number of held-out cases in imagesTs / labelsTs.
        shape: output grid (D, H, W), voxels.
        spacing_mm: voxel size, mm (one value or three).
        seed: dataset seed; case i of a split is seeded by :func:`case_seed` (seed, split, i).
        test_split: which subjects fill imagesTs: "test" (``demo_test_XXX``) or "val" (``demo_val_XXX``,
            validation subjects for choosing settings, never the test subjects).
        anatomy: the anatomy factor ranges (default :class:`AnatomyRanges`).
        imaging: the imaging factor ranges (default :class:`ImageRanges`).
        progress: show a tqdm progress bar.

    Returns:
        (training case ids, held-out case ids).

    Example:
        >>> write_demo_dataset("Dataset900_DemoTissue", num_train=2, num_test=1, shape=(32, 32, 32),
        ...                    spacing_mm=5.0)
        (['demo_000', 'demo_001'], ['demo_test_000'])
    """
    from s3d.runtime.progress import progress as progress_bar

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if test_split not in ("test", "val"):
        raise ValueError(f"test_split must be 'test' or 'val', got {test_split!r}")
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train}, {num_test}")
    out = Path(out_dir)
    channels = TASK_CHANNELS[task]
    labels = TISSUE_LABELS if task == "tissue" else LESION_LABELS
    lesions = (2, 10) if task == "lesion" else None
    jobs = [("train", i, f"demo_{i:03d}", "imagesTr", "labelsTr") for i in range(num_train)]
    jobs += [(test_split, i, f"demo_{test_split}_{i:03d}", "imagesTs", "labelsTs") for i in range(num_test)]
    with _one_thread():
        for split, i, case, img_dir, lab_dir in progress_bar(jobs, desc=f"demo {task} ({source})", unit="case",
                                                             enabled=progress):
            key = case_seed(seed, split, i)
            subj = make_subject(key, source, shape, spacing_mm, ranges=anatomy, lesions=lesions)
            for c, contrast in enumerate(channels):
                img = render_image(subj, contrast, seed=[*key, 100 + c], ranges=imaging)
                write_nifti(out / img_dir / f"{case}_{c:04d}.nii.gz", img, subj.affine)
            write_nifti(out / lab_dir / f"{case}.nii.gz", subj.labels(task), subj.affine)
    meta = {
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": labels,
        "numTraining": num_train,
        "file_ending": ".nii.gz",
        "name": f"s3d demo {task} ({source})",
        "description": f"Synthetic brain MRI from s3d.data.synthetic (source={source}, seed={seed}); "
                       f"labelsTs holds the labels of the held-out {test_split} cases for evaluation.",
        "licence": "CC-BY-4.0" + ("; " + _MNI_COPYRIGHT if source == "mni" else ""),
    }
    write_json_atomic(out / "dataset.json", meta)
    return [j[2] for j in jobs if j[0] == "train"], [j[2] for j in jobs if j[0] != "train"]


def unlabelled_contrast(seed: int, index: int, weights: dict[str, float] | None = None) -> str:
    """The sequence of unlabelled volume ``index`` of cohort ``seed`` (drawn with ``weights``).

    Example:
        >>> unlabelled_contrast(0, 0) in CONTRASTS
        True
    """
    w = UNLABELLED_CONTRASTS if weights is None else weights
    names = list(w)
    p = [float(w[k]) for k in names]
    u = seeded_rng([*case_seed(seed, "unlabelled", index), 7]).uniform() * sum(p)
    for name, pk in zip(names, p, strict=True):
        u -= pk
        if u < 0:
            return name
    return names[-1]


def write_unlabelled(
    out_dir: str | os.PathLike[str],
    num: int,
    *,
    source: str = "phantom",
    shape: Sequence[int] = (80, 96, 80),
    spacing_mm: float | Sequence[float] = 2.0,
    contrasts: dict[str, float] | None = None,
    seed: int = 0,
    start: int = 0,
    anatomy: AnatomyRanges | None = None,
    imaging: ImageRanges | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``num`` unlabelled volumes (one sequence each) for pre-training.

    Files are ``{out_dir}/demo_u{i:05d}_{contrast}.nii.gz``; subjects draw every factor of
    :class:`AnatomyRanges` (lesions included) and :class:`ImageRanges`, so pre-training sees the kinds
    of image fine-tuning does, and more.

    Args:
        out_dir: output folder (created if needed).
        num: number of volumes.
        source: "phantom" or "mni" (see :func:`make_subject`).
        shape: grid (D, H, W), voxels.
        spacing_mm: voxel size, mm.
        contrasts: sequence -> weight (default :data:`UNLABELLED_CONTRASTS`).
        seed: cohort seed; volume i is seeded by :func:`case_seed` (seed, "unlabelled", i).
        start: index of the first volume (to write a large cohort in parts).
        anatomy: the anatomy factor ranges.
        imaging: the imaging factor ranges.
        progress: show a tqdm progress bar.

    Returns:
        The written paths, in order.

    Example:
        >>> files = write_unlabelled("unlabelled", 4, shape=(32, 32, 32), spacing_mm=5.0)
        >>> len(files)
        4
    """
    from s3d.runtime.progress import progress as progress_bar

    for c in contrasts or {}:
        if c not in CONTRASTS:
            raise ValueError(f"contrasts must be among {CONTRASTS}, got {c!r}")
    out = Path(out_dir)
    files = []
    with _one_thread():
        for i in progress_bar(range(start, start + num), desc=f"demo unlabelled ({source})", unit="image",
                              enabled=progress):
            key = case_seed(seed, "unlabelled", i)
            contrast = unlabelled_contrast(seed, i, contrasts)
            subj = make_subject(key, source, shape, spacing_mm, ranges=anatomy)
            path = out / f"demo_u{i:05d}_{contrast}.nii.gz"
            write_nifti(path, render_image(subj, contrast, seed=[*key, 100], ranges=imaging), subj.affine)
            files.append(path)
    return files


def write_demo_cohort(
    root: str | os.PathLike[str],
    *,
    task: str = "tissue",
    source: str = "phantom",
    num_train: int = 20,
    num_test: int = 10,
    num_unlabelled: int = 100,
    shape: Sequence[int] = (80, 96, 80),
    spacing_mm: float | Sequence[float] = 2.0,
    seed: int = 0,
    test_split: str = "test",
    progress: bool = True,
) -> DemoCohort:
    """Write a labelled nnU-Net dataset and a folder of unlabelled volumes under ``root``.

    ``root/Dataset900_DemoTissue`` (or ``Dataset901_DemoLesion``) and ``root/unlabelled``. The
    unlabelled subjects are drawn from a different seed stream than the labelled ones.

    Args:
        root: output folder.
        task: "tissue" or "lesion" (see :func:`write_demo_dataset`).
        source: "phantom" or "mni".
        num_train: labelled training cases.
        num_test: held-out cases (images in imagesTs, labels in labelsTs).
        num_unlabelled: unlabelled volumes for pre-training (0: none).
        shape: grid (D, H, W), voxels.
        spacing_mm: voxel size, mm.
        seed: cohort seed.
        test_split: "test" or "val" subjects in imagesTs (see :func:`write_demo_dataset`).
        progress: show tqdm progress bars.

    Returns:
        A :class:`DemoCohort` with the folders and case ids.

    Example:
        >>> cohort = write_demo_cohort("demo", num_train=2, num_test=1, num_unlabelled=2,
        ...                            shape=(32, 32, 32), spacing_mm=5.0)
        >>> sorted(p.name for p in cohort.dataset_dir.iterdir())
        ['dataset.json', 'imagesTr', 'imagesTs', 'labelsTr', 'labelsTs']
    """
    root = Path(root)
    ds_id, name = TASK_DATASET.get(task, (0, ""))
    ds_dir = root / f"Dataset{ds_id:03d}_{name}"
    train, test = write_demo_dataset(ds_dir, task=task, source=source, num_train=num_train, num_test=num_test,
                                     shape=shape, spacing_mm=spacing_mm, seed=seed, test_split=test_split,
                                     progress=progress)
    un_dir = root / "unlabelled" if num_unlabelled > 0 else None
    files = []
    if un_dir is not None:
        files = write_unlabelled(un_dir, num_unlabelled, source=source, shape=shape, spacing_mm=spacing_mm,
                                 seed=seed, progress=progress)
    return DemoCohort(ds_dir, un_dir, train, test, files)
