"""Pre-training recipes: named, JSON-serialisable configurations (a recipe is data, not a subclass).

:data:`RECIPES` is a plain table of :class:`PretrainRecipe` by name: the paper's S3D-B and S3D-L,
the development ablations of Table 1 (1a sparsification, 1b mask ratio), the released nnssl code's
masking for comparison, and the baseline methods of Table 3 (``"mg"``, ``"vf"``, ``"voco"``, paper
Appendix A). Every row names its method (:mod:`s3d.pretrain.methods`); :meth:`PretrainRecipe.lr_phases`
gives its learning-rate schedule.

Schedule note: nnssl steps PolyLR once per "epoch" of 250 steps; s3d steps it after every
optimiser step, ``lr(t) = lr * (1 - t / steps) ** poly_exponent`` (after an optional linear warm-up).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from s3d._dataclasses import from_dict_strict, jsonable, to_jsonable_dict
from s3d._triple import to_3tuple
from s3d.runtime.lr import LRPhase, poly_schedule


@dataclass
class PretrainRecipe:
    """One pre-training configuration.

    Attributes:
        name: registry key, e.g. ``"s3d-b"``.
        method: pre-training method, a key of :data:`s3d.pretrain.methods.METHODS` (``"mae"``,
            ``"mg"``, ``"vf"``, ``"voco"``).
        description: one line; cite the paper's table row where there is one.
        architecture: backbone preset for ``build_resenc_unet`` (``"resenc_l"`` in the paper).
        patch_size: (D, H, W) voxels of one training patch.
        spacing_mm: target isotropic spacing of the pre-training data, mm per voxel.
        batch_size: patches per optimiser step (all devices together).
        steps: optimiser steps.
        optimizer: ``"sgd"`` (SGD with momentum, as nnU-Net/nnssl).
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay (applied to every parameter, as nnU-Net does).
        poly_exponent: PolyLR exponent.
        warmup_steps: linear warm-up from 0 to ``lr`` over this many steps (0 in the paper).
        grad_clip: max global grad norm (12 in nnssl), ``None`` for no clipping.
        method_kwargs: keyword arguments of the method's module; for ``"mae"`` those of
            :class:`s3d.sparse.SparseMAEWrapper` (block_size, mask_ratio, per_sample, mask_token,
            densify, densify_norm, sparse, coarse). Stored in JSON form (lists, not tuples).

    Example:
        >>> r = get_recipe("s3d-b")
        >>> PretrainRecipe.from_json(r.to_json()) == r
        True
    """

    name: str
    method: str = "mae"
    description: str = ""
    architecture: str = "resenc_l"
    patch_size: tuple[int, int, int] = (160, 160, 160)
    spacing_mm: float = 1.0
    batch_size: int = 6
    steps: int = 250_000
    optimizer: str = "sgd"
    lr: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    warmup_steps: int = 0
    grad_clip: float | None = 12.0
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        self.patch_size = to_3tuple(self.patch_size, f"recipe {self.name!r}: patch_size")
        for key in ("batch_size", "steps"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"recipe {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")
        if self.optimizer != "sgd":
            raise ValueError(f"recipe {self.name!r}: optimizer must be 'sgd', got {self.optimizer!r}")
        if self.lr <= 0 or self.poly_exponent < 0 or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"recipe {self.name!r}: need lr > 0, poly_exponent >= 0 and "
                             f"0 <= warmup_steps < steps; got lr={self.lr}, "
                             f"poly_exponent={self.poly_exponent}, "
                             f"warmup_steps={self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"recipe {self.name!r}: grad_clip must be > 0 or None, got {self.grad_clip}")
        self.method_kwargs = jsonable(dict(self.method_kwargs))

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return to_jsonable_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainRecipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        return from_dict_strict(cls, d)

    def to_json(self, indent: int | None = 2) -> str:
        """The recipe as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PretrainRecipe:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def lr_phases(self) -> list[LRPhase]:
        """The learning-rate schedule: a linear warm-up of ``warmup_steps``, then PolyLR to ``steps``.

        Example:
            >>> from s3d.runtime.lr import lr_at
            >>> lr_at(get_recipe("s3d-b").lr_phases(), 0)
            0.01
        """
        return poly_schedule(self.lr, self.steps, self.warmup_steps)

    def replace(self, **changes: Any) -> PretrainRecipe:
        """A validated copy with some fields changed (``method_kwargs`` is merged, not replaced).

        Example:
            >>> get_recipe("s3d-b").replace(steps=10, method_kwargs={"mask_ratio": 0.75}).steps
            10
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown PretrainRecipe field(s) {unknown}; known: {sorted(known)}")
        d = self.to_dict()
        kwargs = dict(d["method_kwargs"])
        kwargs.update(changes.pop("method_kwargs", {}) or {})
        d.update(changes)
        d["method_kwargs"] = kwargs
        return PretrainRecipe.from_dict(d)


# ---- the table ------------------------------------------------------------------------------------
#: The paper's S3D-B sparse MAE settings; ablations change one thing each.
_S3D_MAE = {
    "block_size": 32,
    "mask_ratio": [0.6, 0.9],
    "per_sample": True,
    "sparse": True,
    "mask_token": True,
    "densify": True,
    "coarse": "pool",
}
_DEV_MAE = {**_S3D_MAE, "mask_ratio": 0.75}  # the development default of Table 1 (75 %)


def _mae(name: str, description: str, **kw: Any) -> PretrainRecipe:
    base = dict(_DEV_MAE)
    base.update(kw.pop("method_kwargs", {}))
    return PretrainRecipe(name=name, method="mae", description=description, method_kwargs=base, **kw)


def _baselines() -> list[PretrainRecipe]:
    """The baseline methods on ResEnc-L (paper Appendix A) with the paper's common settings: SGD lr 1e-2,
    momentum 0.99 (Nesterov), weight decay 3e-5, per-step PolyLR (0.9), 250k steps, 1 mm z-scored data.

    - ``mg``: Models Genesis at the official rates (non-linear 0.9, local shuffle 0.5, paint 0.9 with
      out-paint 0.8 / in-paint 0.2, flips 0.4); patch 160^3, batch 6 (as S3D-B).
    - ``vf``: VolumeFusion, 5 classes (K = 4), M ~ U{10..40} rectangles, sides U[8, 0.625 * patch]
      = [8, 100] voxels; patch 160^3, batch 6.
    - ``voco``: VoCo, 64^3 crops on a 3x3 grid of a 192x192x64 patch, 5 target crops, batch 12.
    """
    return [
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
    ]


def _table() -> dict[str, PretrainRecipe]:
    rows = [
        _mae("s3d-b", "S3D-B: sparse MAE, ratio U[0.6, 0.9], batch 6, lr 1e-2, 250k steps (Table 1c)",
             method_kwargs={"mask_ratio": [0.6, 0.9]}),
        _mae("s3d-l", "S3D-L: S3D-B scaled to batch 48, lr 3e-2, 1M steps (Table 1c)",
             batch_size=48, lr=3e-2, steps=1_000_000, method_kwargs={"mask_ratio": [0.6, 0.9]}),
        _mae("s3d-b-nnssl-mask", "S3D-B with the released nnssl code's masking: 16^3 cells, unmasked "
             "bottleneck, one ratio per batch (not in the paper's text)",
             method_kwargs={"mask_ratio": [0.6, 0.9], "block_size": 16, "coarse": "ones",
                            "per_sample": False}),
        # Table 1a: sparsification, added one at a time, at the development ratio 75 %.
        _mae("t1a-base", "Table 1a 'Base': dense encoder on the masked image, no mask token, no densify conv",
             method_kwargs={"sparse": False, "mask_token": False, "densify": False}),
        _mae("t1a-sparse", "Table 1a '+ Sparse Conv. + Norm': masked conv and norm, no mask token",
             method_kwargs={"mask_token": False, "densify": False}),
        _mae("t1a-mask-token", "Table 1a '+ w/ Mask Token': sparse + masked norm + token, no densify conv",
             method_kwargs={"densify": False}),
        _mae("t1a-densify", "Table 1a '+ w/ Dens. Conv.': all sparsification pieces (ratio 75 %)"),
    ]
    # Table 1b: mask ratios, all sparsification pieces on.
    for pct in (30, 45, 60, 75, 90):
        rows.append(_mae(f"t1b-ratio-{pct}", f"Table 1b: fixed mask ratio {pct} %",
                         method_kwargs={"mask_ratio": pct / 100}))
    rows.append(_mae("t1b-ratio-60-90", "Table 1b: mask ratio U[60 %, 90 %] (= S3D-B)",
                     method_kwargs={"mask_ratio": [0.6, 0.9]}))
    rows += _baselines()
    return {r.name: r for r in rows}


#: Registry of pre-training recipes by name (a plain table; add rows for new methods).
RECIPES: dict[str, PretrainRecipe] = _table()


def list_recipes(method: str | None = None) -> list[str]:
    """Sorted recipe names, optionally only those of one ``method``.

    Example:
        >>> "s3d-b" in list_recipes("mae")
        True
    """
    return sorted(n for n, r in RECIPES.items() if method is None or r.method == method)


def get_recipe(name: str) -> PretrainRecipe:
    """A copy of the named recipe (changing it does not change the table).

    Example:
        >>> get_recipe("s3d-l").batch_size
        48
    """
    try:
        return copy.deepcopy(RECIPES[name])
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; available: {list_recipes()}") from None


def register_recipe(recipe: PretrainRecipe, overwrite: bool = False) -> None:
    """Add ``recipe`` to :data:`RECIPES`; an existing name is an error unless ``overwrite``."""
    if recipe.name in RECIPES and not overwrite:
        raise ValueError(f"recipe {recipe.name!r} already exists; pass overwrite=True to replace it")
    RECIPES[recipe.name] = copy.deepcopy(recipe)
