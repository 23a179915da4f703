"""Synthetic brain-MRI cohorts: brain-MRI-like 3D volumes that need no download (the demo data).

Two anatomy sources feed one pipeline:

- ``"mni"``: the MNI ICBM152 2009 1 mm T1 template and its grey/white-matter probability maps, which
  ship inside the ``nilearn`` wheel (``pip install "s3d[demo]"``). CSF is the brain mask minus GM
  and WM.
- ``"phantom"``: a procedural head (ellipsoidal brain, folded cortex, ventricles, deep grey nuclei)
  with no extra dependency; the tests use it.

Per subject, the anatomy is warped by a random affine (rotation, scale, shift) plus a smooth random
deformation and resampled onto the output grid with ``torch.nn.functional.grid_sample``, giving
partial-volume maps of CSF, GM and WM. Images are then rendered from those maps with per-contrast
tissue intensities (T1-, T2-, FLAIR-like), optional synthetic lesions (MS-like: hyperintense on
FLAIR and T2, hypointense on T1, mostly in white matter), a multiplicative bias field, an optional
thick-slice acquisition (blur along one axis), and Rician noise. Images are stored as int16
"scanner units", skull-stripped (zero outside the brain).

Everything is deterministic per seed: a case's random stream is derived from ``(seed, split,
index)``, so adding cases never changes the existing ones.

Modules: :mod:`~s3d.data.synthetic.anatomy` (templates, warps, lesions: one subject's tissue maps),
:mod:`~s3d.data.synthetic.render` (contrasts, bias field, thick slices, noise: one image) and
:mod:`~s3d.data.synthetic.cohort` (nnU-Net datasets and unlabelled folders on disk).

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
    TASK_CHANNELS,
    TASK_DATASET,
    DemoCohort,
    write_demo_cohort,
    write_demo_dataset,
    write_unlabelled,
)
from s3d.data.synthetic.render import CONTRASTS, SCANNER_UNITS, TISSUE_INTENSITY, render_image

__all__ = [
    "CONTRASTS",
    "LESION_LABELS",
    "SCANNER_UNITS",
    "SOURCES",
    "TASKS",
    "TASK_CHANNELS",
    "TASK_DATASET",
    "TISSUE_INTENSITY",
    "TISSUE_LABELS",
    "DemoCohort",
    "DemoSubject",
    "make_subject",
    "render_image",
    "write_demo_cohort",
    "write_demo_dataset",
    "write_unlabelled",
]
