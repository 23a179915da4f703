"""Recipes of the baseline pre-training methods (paper Appendix A), registered on import.

All share the paper's common settings (Appendix A): ResEnc-L, SGD lr 1e-2, momentum 0.99 (Nesterov,
as nnU-Net), weight decay 3e-5, per-step PolyLR (exponent 0.9), 250k steps, 1 mm isotropic
z-scored data. Method-specific numbers:

- ``mg``: Models Genesis at the official rates (non-linear 0.9, local shuffle 0.5, paint 0.9 with
  out-paint 0.8 / in-paint 0.2, flips 0.4); patch 160^3, batch 6 (as S3D-B).
- ``vf``: VolumeFusion, 5 classes (K = 4), M ~ U{10..40} rectangles, sides U[8, 0.625 * patch]
  = [8, 100] voxels; patch 160^3, batch 6.
- ``voco``: VoCo, 64^3 crops on a 3x3 grid of a 192x192x64 patch, 5 target crops, batch 12.
"""

from __future__ import annotations

from s3d.train.recipes import RECIPES, PretrainRecipe, register_recipe

#: The baseline recipes, by name.
BASELINE_RECIPES: dict[str, PretrainRecipe] = {
    r.name: r
    for r in (
        PretrainRecipe(
            name="mg", method="mg",
            description="Models Genesis on ResEnc-L: official MG rates, patch 160^3, batch 6, 250k steps "
                        "(Table 3 'MG', Appendix A.1)",
            method_kwargs={"nonlinear_rate": 0.9, "local_rate": 0.5, "paint_rate": 0.9, "outpaint_rate": 0.8,
                           "flip_rate": 0.4},
        ),
        PretrainRecipe(
            name="vf", method="vf",
            description="VolumeFusion on ResEnc-L: 5 classes, M~U(10,40) rectangles of sides U[8,100], "
                        "Dice+CE, patch 160^3, batch 6, 250k steps (Table 3 'VF', Appendix A.2)",
            method_kwargs={"num_classes": 5, "num_rectangles": [10, 40], "min_side": 8,
                           "max_fraction": 0.625},
        ),
        PretrainRecipe(
            name="voco", method="voco",
            description="VoCo on ResEnc-L: 64^3 crops, 3x3 base grid on a 192x192x64 patch, 5 target crops, "
                        "batch 12, 250k steps (Table 3 'VoCo', Appendix A.3)",
            patch_size=(192, 192, 64), batch_size=12,
            method_kwargs={"crop_size": 64, "num_targets": 5},
        ),
    )
}


def register_baseline_recipes() -> None:
    """Add :data:`BASELINE_RECIPES` to the recipe table (idempotent; an existing equal row is kept)."""
    for name, recipe in BASELINE_RECIPES.items():
        if name in RECIPES and RECIPES[name] == recipe:
            continue
        register_recipe(recipe, overwrite=False)


register_baseline_recipes()
