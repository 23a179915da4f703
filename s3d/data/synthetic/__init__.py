"""Synthetic brain-MRI cohorts (no download): anatomy, MR-like rendering, nnU-Net datasets."""

from s3d.data.synthetic.anatomy import (
    CONTRASTS,
    LESION_LABELS,
    SCANNER_UNITS,
    SOURCES,
    TASK_CHANNELS,
    TASK_DATASET,
    TASKS,
    TISSUE_INTENSITY,
    TISSUE_LABELS,
    DemoCohort,
    DemoSubject,
    make_subject,
    render_image,
    write_demo_cohort,
    write_demo_dataset,
    write_unlabelled,
)

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
