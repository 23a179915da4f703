"""Synthetic brain-MRI cohorts: brain-MRI-like 3D volumes that need no download (the demo data).

Two anatomy sources feed one pipeline:

- ``"mni"``: the MNI ICBM152 2009 1 mm T1 template and its grey/white-matter probability maps, which
  ship inside the ``nilearn`` wheel (``pip install "s3d[demo]"``).
- ``"phantom"``: a procedural head (ellipsoidal brain, folded cortex, ventricles, deep grey nuclei)
  with no extra dependency; the tests use it.

Subjects differ in more than one template's warps (:mod:`~s3d.data.synthetic.factors` lists every
factor and its range; docs/quickstart.md has the table): head size and shape, pose, a lobe-scale
and a gyral-scale deformation, ventricle inflation, atrophy inside an unchanged skull, the CSF rim
between brain and skull, skull and scalp thickness, a cut field of view and MS-like lesions; each
image has its own sequence (T1, T2, FLAIR, PD), per-subject tissue intensities, gamma, bias field,
noise level, resolution (thick slices, lower resolution) and is skull-stripped or not. Images are
int16 "scanner units".

Everything is deterministic per seed: a case's random stream is derived from ``(seed, split,
index)`` (:func:`case_seed`), so adding cases never changes the existing ones and the splits never
share a subject.

Modules: :mod:`~s3d.data.synthetic.factors` (the ranges), :mod:`~s3d.data.synthetic.templates`
(MNI152 and phantom sampled at any coordinates), :mod:`~s3d.data.synthetic.anatomy` (one subject's
maps), :mod:`~s3d.data.synthetic.render` (one image) and :mod:`~s3d.data.synthetic.cohort` (nnU-Net
datasets and unlabelled folders on disk).

Labelled tasks:

- ``"tissue"``: 0 background, 1 CSF, 2 GM, 3 WM (argmax of the partial-volume maps); one T1 channel.
- ``"lesion"``: 0 background, 1 lesion (lesion fraction > 0.5); channels FLAIR and T1.

Example:
    >>> from s3d.data.synthetic import write_demo_cohort
    >>> cohort = write_demo_cohort("demo_data", source="phantom", num_train=4, num_test=2,
    ...                            num_unlabelled=8, shape=(48, 48, 48), spacing_mm=3.5)
    >>> cohort.dataset_dir.name
    'Dataset900_DemoTissue'
"""

from s3d.data.synthetic.anatomy import LESION_LABELS, SOURCES, TASKS, TISSUE_LABELS, DemoSubject, make_subject
from s3d.data.synthetic.cohort import (
    SPLIT_CODE,
    TASK_CHANNELS,
    TASK_DATASET,
    UNLABELLED_CONTRASTS,
    DemoCohort,
    case_seed,
    unlabelled_contrast,
    write_demo_cohort,
    write_demo_dataset,
    write_unlabelled,
)
from s3d.data.synthetic.factors import SEQUENCE_INTENSITY, AnatomyRanges, ImageRanges
from s3d.data.synthetic.render import CONTRASTS, SCANNER_UNITS, TISSUE_INTENSITY, render_image

__all__ = [
    "CONTRASTS",
    "LESION_LABELS",
    "SCANNER_UNITS",
    "SEQUENCE_INTENSITY",
    "SOURCES",
    "SPLIT_CODE",
    "TASKS",
    "TASK_CHANNELS",
    "TASK_DATASET",
    "TISSUE_INTENSITY",
    "TISSUE_LABELS",
    "UNLABELLED_CONTRASTS",
    "AnatomyRanges",
    "DemoCohort",
    "DemoSubject",
    "ImageRanges",
    "case_seed",
    "make_subject",
    "render_image",
    "unlabelled_contrast",
    "write_demo_cohort",
    "write_demo_dataset",
    "write_unlabelled",
]
