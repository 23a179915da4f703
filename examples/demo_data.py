"""Generate the built-in demo data (no download) and save a picture of one case.

    python examples/demo_data.py --quick                 # procedural phantom, tiny volumes (~2 s)
    python examples/demo_data.py --source mni --out demo_data   # MNI152-based (pip install "s3d[demo]")

Writes OUT/Dataset900_DemoTissue (nnU-Net v2 raw format: dataset.json, imagesTr, labelsTr, imagesTs,
labelsTs), OUT/Dataset901_DemoLesion (FLAIR + T1 with lesion masks), OUT/unlabelled (volumes for
pre-training) and OUT/preview.png (middle slices of T1, T2, FLAIR, tissue labels, lesion mask).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from s3d.data.synthetic import make_subject, render_image, write_demo_cohort

parser = argparse.ArgumentParser()
parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
parser.add_argument("--source", default="phantom", choices=["phantom", "mni"])
parser.add_argument("--quick", action="store_true", help="a few small volumes (the CI setting)")
args = parser.parse_args()

out = Path(args.out or tempfile.mkdtemp(prefix="s3d_demo_data_"))
shape, spacing, n = ((40, 48, 40), 4.0, 2) if args.quick else ((80, 96, 80), 2.0, 10)
for task in ("tissue", "lesion"):
    cohort = write_demo_cohort(out, task=task, source=args.source, num_train=n, num_test=n // 2,
                               num_unlabelled=n if task == "tissue" else 0, shape=shape, spacing_mm=spacing)
    print(f"{task}: {cohort.dataset_dir} ({len(cohort.train_cases)} train, {len(cohort.test_cases)} test)")
print(f"unlabelled: {out / 'unlabelled'}")

# one subject, all contrasts, its tissue labels and lesion mask: middle axial slices side by side
subj = make_subject(0, args.source, shape, spacing, lesions=(4, 8))
panels = [render_image(subj, c, seed=0, thick_slice_prob=0.0).astype(np.float32)
          for c in ("T1", "T2", "FLAIR")]
panels = [p / max(float(np.percentile(p, 99.5)), 1.0) for p in panels]
panels += [subj.tissue_labels() / 3.0, subj.lesion_mask().astype(np.float32)]
k = subj.shape[2] // 2 + 2
row = np.concatenate([np.rot90(np.clip(p[:, :, k], 0, 1)) for p in panels], axis=1)
img = Image.fromarray((row * 255).astype(np.uint8))
img = img.resize((row.shape[1] * 3, row.shape[0] * 3), Image.NEAREST)
img.save(out / "preview.png")
print(f"preview: {out / 'preview.png'}  (T1, T2, FLAIR, tissue labels, lesions)")
