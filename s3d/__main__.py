"""``python -m s3d`` runs the command line (and lets ``torchrun -m s3d`` launch it)."""

import sys

from s3d.cli import main

sys.exit(main())
