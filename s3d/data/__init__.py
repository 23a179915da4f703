"""Data: NIfTI I/O with geometry, preprocessing (crop, z-score, resampling), datasets."""
