"""The pre-training loop: one loop for every method, on CPU, one GPU or N processes (torchrun/DDP).

:func:`pretrain` takes a :class:`PretrainConfig` (a prepared data directory, see
:func:`s3d.data.scan.prepare`, a recipe name and overrides) and runs:

- the method built by :func:`build_method` (``"mae"`` -> :class:`s3d.sparse.SparseMAEWrapper`;
  other names from :mod:`s3d.pretext`) around a fresh He-initialised ResEnc U-Net;
- the recipe's SGD and per-step PolyLR, gradient-norm clipping, AMP (bf16 where supported, fp16 with
  a GradScaler otherwise, off on CPU), optional channels_last_3d and ``torch.compile``;
- batched augmentation on the training device (:mod:`s3d.data.augment`);
- DDP when launched with ``torchrun`` (global batch split across ranks, data sharded per rank, a
  method's ``loss_weight`` normalised over the global batch, rank 0 logs and writes checkpoints);
- a held-out validation loss (split by subject), PNG reconstruction snapshots, ``metrics.jsonl``,
  optional TensorBoard, a tqdm bar with steps/s and ETA;
- complete atomic checkpoints (model, optimiser, scheduler, scaler, RNG states, sampler position).

Reproducibility: the crops, the augmentation and the method's own randomness (e.g. the MAE mask) of
step ``t`` on rank ``r`` are drawn from streams seeded by ``(seed, r, t)``. Resuming at step ``t``
therefore reproduces the uninterrupted run exactly (bitwise on CPU); the global RNG states are
saved and restored too, for code that draws from them between steps.

At the end the backbone is exported with :func:`s3d.hub.save_pretrained` (``RUN/backbone``) and as
an nnssl checkpoint (``RUN/nnssl/checkpoint_final.pth`` + ``adaptation_plan.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from s3d._fs import atomic_path, write_json_atomic, write_text_atomic
from s3d.train.distributed import (
    DistInfo,
    barrier,
    cleanup,
    global_weighted_loss,
    init_distributed,
    mean_across,
)
from s3d.train.recipes import PretrainRecipe, build_optimizer, build_scheduler, get_recipe

CHECKPOINT_NAME = "checkpoint_latest.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "s3d-pretrain-checkpoint"
CHECKPOINT_VERSION = 1
AMP_MODES = ("auto", "bf16", "fp16", "none")

# purposes of the derived random streams
_AUGMENT, _METHOD, _VAL = 1, 2, 3


@dataclass
class PretrainConfig:
    """Everything a pre-training run needs besides the recipe's own numbers.

    Attributes:
        data: prepared directory (holds ``manifest.json``, see :func:`s3d.data.scan.prepare`).
        out: run directory (checkpoints, metrics, snapshots, exports).
        recipe: recipe name (``"s3d-b"``, ``"s3d-l"``, ...) or a :class:`PretrainRecipe`.
        architecture: backbone preset overriding the recipe's (``"tiny"`` for tests/demos).
        steps / batch_size / patch_size / lr: overrides of the recipe (``batch_size`` is global:
            all processes together).
        method_kwargs: merged into the recipe's ``method_kwargs``.
        seed: run seed (model init, data, augmentation, masks).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        amp: ``"auto"`` (bf16 on GPUs that support it, else fp16; off on CPU), ``"bf16"``, ``"fp16"``,
            ``"none"``.
        channels_last: channels_last_3d memory format for model and input (measure: can be slower
            with InstanceNorm3d).
        compile: wrap the training module in ``torch.compile``.
        workers / prefetch_factor: DataLoader worker processes and batches prefetched per worker.
        augment: apply the paper's spatial augmentation.
        val_fraction: fraction of subjects held out for the validation loss.
        val_every / val_max_cases: validation interval (steps) and number of held-out images used.
        snapshot_every: PNG reconstruction snapshot interval (steps); 0 = off.
        checkpoint_every: checkpoint interval (steps); a checkpoint is also written at the end.
        log_every: metrics line interval (steps).
        tensorboard: also log to TensorBoard (``RUN/tb``; needs the ``tensorboard`` package).
        resume: continue from ``RUN/checkpoint_latest.pt``.
        stop_after: stop after this global step as if killed (no export); for time-limited job slots.
        progress: show a progress bar (rank 0).
    """

    data: str
    out: str
    recipe: str | PretrainRecipe = "s3d-b"
    architecture: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    patch_size: tuple[int, int, int] | None = None
    lr: float | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    workers: int = 4
    prefetch_factor: int = 4
    augment: bool = True
    val_fraction: float = 0.02
    val_every: int = 1000
    val_max_cases: int = 16
    snapshot_every: int = 5000
    checkpoint_every: int = 1000
    log_every: int = 1
    tensorboard: bool = False
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True

    def resolved_recipe(self) -> PretrainRecipe:
        """The recipe with this config's overrides applied."""
        recipe = _get_recipe(self.recipe) if isinstance(self.recipe, str) else self.recipe
        changes: dict[str, Any] = {}
        for key in ("architecture", "steps", "batch_size", "patch_size", "lr"):
            value = getattr(self, key)
            if value is not None:
                changes[key] = tuple(value) if key == "patch_size" else value
        if self.method_kwargs:
            changes["method_kwargs"] = dict(self.method_kwargs)
        return recipe.replace(**changes) if changes else recipe

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the recipe as its name or dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.recipe, PretrainRecipe):
            d["recipe"] = self.recipe.to_dict()
        return json.loads(json.dumps(d))


def _get_recipe(name: str) -> PretrainRecipe:
    """:func:`get_recipe`, importing :mod:`s3d.pretext` (which registers its recipes) when needed."""
    from s3d.train.recipes import RECIPES

    if name not in RECIPES:
        try:
            import s3d.pretext  # noqa: F401  (registers "mg", "vf", "voco")
        except ImportError:
            pass
    return get_recipe(name)


# ---- the method ------------------------------------------------------------------------------------
def build_method(recipe: PretrainRecipe, backbone: nn.Module) -> nn.Module:
    """The pre-training module of ``recipe.method`` around ``backbone``.

    The returned module's ``forward(x)`` takes a (B, C, D, H, W) batch and returns an object with a
    scalar ``.loss`` (and optionally ``.reconstruction``/``.mask``/``.target`` for snapshots, and
    ``.loss_weight``, the loss's denominator, which multi-process runs sum over the ranks); its
    ``export_backbone()`` returns the backbone's state dict. ``"mae"`` builds
    :class:`s3d.sparse.SparseMAEWrapper` with ``recipe.method_kwargs``; any other name is looked up
    with ``s3d.pretext.build(name, backbone, **method_kwargs)``.

    Example:
        >>> net = build_resenc_unet("tiny", in_channels=1, num_classes=1)
        >>> mae = build_method(get_recipe("s3d-b"), net)
    """
    if recipe.method == "mae":
        from s3d.sparse import SparseMAEWrapper

        return SparseMAEWrapper(backbone, **recipe.method_kwargs)
    try:
        import s3d.pretext as pretext  # type: ignore[import-not-found]
    except ImportError as e:
        raise ValueError(f"recipe {recipe.name!r}: method {recipe.method!r} is not built in (only 'mae' is) "
                         f"and s3d.pretext cannot be imported ({e})") from e
    build = getattr(pretext, "build", None)
    if build is None:
        raise ValueError(f"recipe {recipe.name!r}: s3d.pretext has no build(name, backbone, **kwargs) "
                         f"to construct method {recipe.method!r}")
    method = build(recipe.method, backbone, **recipe.method_kwargs)
    if not hasattr(method, "export_backbone"):
        raise TypeError(f"method {recipe.method!r}: {type(method).__name__} has no export_backbone()")
    return method


# ---- small helpers -------------------------------------------------------------------------------------
def stream_seed(seed: int, rank: int, step: int, purpose: int) -> int:
    """A 63-bit seed for the random stream of (run seed, rank, step, purpose).

    Example:
        >>> stream_seed(0, 0, 10, 1) == stream_seed(0, 0, 10, 1) != stream_seed(0, 0, 11, 1)
        True
    """
    state = np.random.SeedSequence([seed, rank, step, purpose]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def _resolve_device(device: str, info: DistInfo) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda", info.local_rank)
    return torch.device(device)


def _resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp not in AMP_MODES:
        raise ValueError(f"amp: expected one of {AMP_MODES}, got {amp!r}")
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' or 'none' on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, NumPy, Python) in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a pre-training checkpoint (``torch.load(weights_only=True)``) and check its format.

    Example:
        >>> ckpt = load_checkpoint("run/checkpoint_latest.pt"); ckpt["step"]
        1000
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an s3d pre-training checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines after ``last_step`` (written after the checkpoint by a killed run)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def read_metrics(run_dir: str | Path, key: str = "loss") -> dict[int, float]:
    """``{step: value}`` of ``key`` from a run's ``metrics.jsonl``.

    Example:
        >>> read_metrics("run")[1]
        1.02
    """
    out = {}
    for ln in (Path(run_dir) / METRICS_NAME).read_text(encoding="utf-8").splitlines():
        rec = json.loads(ln)
        if key in rec:
            out[int(rec["step"])] = float(rec[key])
    return out


# ---- snapshots ---------------------------------------------------------------------------------------
def snapshot_image(panels: list[torch.Tensor], clip: float = 3.0) -> np.ndarray:
    """A uint8 grid: rows = three orthogonal centre slices, columns = ``panels`` (each (D, H, W)).

    Values are clipped to [-clip, clip] (z-score units) and mapped to 0..255.

    Example:
        >>> snapshot_image([torch.zeros(8, 8, 8)] * 4).shape
        (24, 32)
    """
    rows = []
    for axis in range(3):
        cells = []
        for vol in panels:
            v = vol.detach().float().cpu()
            sl = v.select(axis, v.shape[axis] // 2).numpy()
            cells.append(np.clip((sl + clip) / (2 * clip) * 255.0, 0, 255).astype(np.uint8))
        h = max(c.shape[0] for c in cells)
        rows.append(np.concatenate([np.pad(c, ((0, h - c.shape[0]), (0, 0))) for c in cells], axis=1))
    w = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, w - r.shape[1]))) for r in rows], axis=0)


def _write_png(path: Path, image: np.ndarray) -> None:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with most torch installs
        raise ImportError('reconstruction snapshots need Pillow: pip install "s3d[plot]" (or pillow), '
                          "or pass --snapshot-every 0") from e
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


# ---- the loop ----------------------------------------------------------------------------------------
class _Run:
    """State of one pre-training run (kept in one object so the loop reads top to bottom)."""

    def __init__(self, cfg: PretrainConfig) -> None:
        from s3d.data.pretrain_dataset import shard_cases, split_subjects
        from s3d.data.scan import read_manifest, training_cases
        from s3d.nn import build_resenc_unet

        self.cfg = cfg
        self.info = init_distributed(cfg.device)
        self.device = _resolve_device(cfg.device, self.info)
        self.amp_dtype = _resolve_amp(cfg.amp, self.device)
        self.recipe = cfg.resolved_recipe()
        self.out = Path(cfg.out)
        if self.recipe.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {self.recipe.batch_size} (global) is not divisible by the "
                             f"{self.info.world_size} processes")
        self.local_batch = self.recipe.batch_size // self.info.world_size

        cases = training_cases(read_manifest(cfg.data), cfg.data)
        if not cases:
            raise ValueError(f"{cfg.data}: the manifest lists no preprocessed image")
        train, val = split_subjects(cases, cfg.val_fraction, cfg.seed)
        self.train_files = [c["file"] for c in shard_cases(train, self.info.rank, self.info.world_size)]
        self.val_files = [c["file"] for c in val[: cfg.val_max_cases]]
        self.n_train, self.n_val = len(train), len(val)

        torch.manual_seed(cfg.seed)
        backbone = build_resenc_unet(self.recipe.architecture, in_channels=1, num_classes=1,
                                     deep_supervision=False)
        self.method = build_method(self.recipe, backbone).to(self.device)
        if cfg.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last_3d)
        self.optimizer = build_optimizer(self.recipe, self.method)
        self.scheduler = build_scheduler(self.recipe, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.start_step = 0

    # ---- checkpoints ----
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def save_checkpoint(self, step: int) -> None:
        if not self.info.is_main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "data": {"seed": self.cfg.seed, "step": step, "world_size": self.info.world_size,
                     "local_batch": self.local_batch, "n_train": self.n_train, "n_val": self.n_val},
            "recipe": self.recipe.to_dict(),
            "config": self.cfg.to_dict(),
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(ckpt, tmp)

    def maybe_resume(self) -> None:
        exists = self.checkpoint_path.is_file()
        if exists and not self.cfg.resume:
            raise FileExistsError(f"{self.checkpoint_path} exists; pass --resume to continue that run "
                                  f"or choose a new --out")
        if not exists:
            if self.cfg.resume and self.info.is_main:
                warnings.warn(f"--resume: no {self.checkpoint_path}; starting from step 0", stacklevel=2)
            return
        ckpt = load_checkpoint(self.checkpoint_path, map_location=self.device)
        if ckpt["recipe"] != self.recipe.to_dict() and self.info.is_main:
            now = self.recipe.to_dict()
            diff = sorted(k for k in ckpt["recipe"] if ckpt["recipe"][k] != now.get(k))
            warnings.warn(f"resuming with a recipe that differs from the checkpoint's in {diff}",
                          stacklevel=2)
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.start_step = int(ckpt["step"])
        if ckpt["data"]["world_size"] != self.info.world_size and self.info.is_main:
            warnings.warn(f"checkpoint written by {ckpt['data']['world_size']} process(es), resuming on "
                          f"{self.info.world_size}: the data stream differs from an uninterrupted run",
                          stacklevel=2)

    # ---- evaluation helpers ----
    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def validate(self) -> float | None:
        from s3d.data.pretrain_dataset import CenterCropDataset

        if not self.val_files:
            return None
        ds = CenterCropDataset(self.val_files, self.recipe.patch_size)
        total, n = 0.0, 0.0
        self.method.eval()
        torch.manual_seed(stream_seed(self.cfg.seed, 0, 0, _VAL))
        for i in range(0, len(ds), self.local_batch):
            x = torch.stack([ds[j] for j in range(i, min(i + self.local_batch, len(ds)))])
            x = self._prepare_input(x)
            with self._autocast():
                out = self.method(x)
            # weight each batch by its loss denominator (MAE: masked voxels) when the method reports it, so
            # the value is the masked-voxel mean over the whole validation set, as the training loss is
            # over the global batch; otherwise by its number of images
            weight = getattr(out, "loss_weight", None)
            w = float(weight) if weight is not None else float(x.shape[0])
            total, n = total + float(out.loss) * w, n + w
        self.method.train()
        return total / n if n > 0 else float("nan")

    @torch.no_grad()
    def snapshot(self, step: int, fallback: torch.Tensor) -> Path | None:
        from s3d.data.pretrain_dataset import CenterCropDataset

        x = (CenterCropDataset(self.val_files[:1], self.recipe.patch_size)[0][None] if self.val_files
             else fallback[:1].float().cpu())
        x = self._prepare_input(x)
        self.method.eval()
        torch.manual_seed(stream_seed(self.cfg.seed, 0, step, _VAL))
        with self._autocast():
            out = self.method(x)
        self.method.train()
        rec = getattr(out, "reconstruction", None)
        if rec is None:
            return None
        mask = getattr(out, "mask", None)
        masked = x
        if mask is not None:
            from s3d.nn.masked import expand_keep

            masked = x * expand_keep(mask, x.shape[2:]).to(x.dtype)
        target = getattr(out, "target", None)
        target = x if target is None else target
        image = snapshot_image([x[0, 0], masked[0, 0], rec[0, 0], target[0, 0]])
        path = self.out / "snapshots" / f"step_{step:08d}.png"
        _write_png(path, image)
        return path

    # ---- export ----
    def export(self) -> dict[str, str]:
        from s3d.hub import nnssl_checkpoint, save_pretrained
        from s3d.hub.nnssl import adaptation_plan
        from s3d.nn import build_resenc_unet

        backbone = build_resenc_unet(self.method.backbone.config)
        backbone.load_state_dict(self.method.export_backbone())
        recipe = self.recipe.to_dict()
        provenance = (f"Pre-trained with s3d recipe {self.recipe.name!r} ({self.recipe.method}) for "
                      f"{self.recipe.steps} steps at batch {self.recipe.batch_size} on {self.n_train} images "
                      f"of {self.cfg.data}.")
        hub_dir = save_pretrained(backbone, self.out / "backbone", recipe=recipe, provenance=provenance)
        nn_dir = self.out / "nnssl"
        nn_dir.mkdir(parents=True, exist_ok=True)
        ckpt = nnssl_checkpoint(backbone.state_dict(), backbone.config, trainer_name="s3d.pretrain")
        ckpt["current_epoch"] = self.recipe.steps // 250  # nnssl counts epochs of 250 steps
        ckpt["nnssl_adaptation_plan"] = adaptation_plan(backbone.config, self.recipe.patch_size)
        with atomic_path(nn_dir / "checkpoint_final.pth") as tmp:
            torch.save(ckpt, tmp)
        write_json_atomic(nn_dir / "adaptation_plan.json", ckpt["nnssl_adaptation_plan"])
        return {"backbone": str(hub_dir), "nnssl": str(nn_dir / "checkpoint_final.pth")}

    # ---- train ----
    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from s3d.data.augment import BatchAugment
        from s3d.data.pretrain_dataset import build_pretrain_loader

        cfg, info, recipe = self.cfg, self.info, self.recipe
        main = info.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(info)
        self.maybe_resume()
        metrics = self.out / METRICS_NAME
        if main:
            _truncate_metrics(metrics, self.start_step)
            write_json_atomic(self.out / "run.json", {"recipe": recipe.to_dict(), "config": cfg.to_dict(),
                                                      "world_size": info.world_size, "n_train": self.n_train,
                                                      "n_val": self.n_val})
        tb = None
        if main and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--tensorboard needs the tensorboard package: "
                                  "pip install tensorboard") from e
            tb = SummaryWriter(str(self.out / "tb"))

        model: nn.Module = self.method
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        stop = recipe.steps if cfg.stop_after is None else min(recipe.steps, cfg.stop_after)
        loader = build_pretrain_loader(self.train_files, recipe.patch_size, self.local_batch, self.start_step,
                                       stop, seed=cfg.seed, rank=info.rank, workers=cfg.workers,
                                       pin_memory=self.device.type == "cuda",
                                       prefetch_factor=cfg.prefetch_factor)
        augment = BatchAugment() if cfg.augment else None
        params = [p for p in self.method.parameters() if p.requires_grad]
        bar = tqdm(total=recipe.steps, initial=self.start_step, desc="pretrain", unit="step",
                   disable=not (main and cfg.progress), dynamic_ncols=True)
        t_last, step_last = time.perf_counter(), self.start_step
        step = self.start_step
        last_loss = float("nan")
        self.method.train()
        for batch in loader:
            x = self._prepare_input(batch)
            if augment is not None:
                g = torch.Generator().manual_seed(stream_seed(cfg.seed, info.rank, step, _AUGMENT))
                x = augment(x, g)
            torch.manual_seed(stream_seed(cfg.seed, info.rank, step, _METHOD))
            with self._autocast():
                out = model(x)
            loss = out.loss
            loss_weight = getattr(out, "loss_weight", None)
            global_loss = None
            if info.enabled and loss_weight is not None:
                # normalise by the global batch's loss weight (e.g. masked voxels of all ranks), not
                # per rank: DDP's gradient average then equals one process with the whole batch
                loss, global_loss = global_weighted_loss(loss, loss_weight, info)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            grad_norm = torch.full((), float("nan"))
            if recipe.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            step += 1
            if step % cfg.log_every == 0 or step == stop:  # no host sync between log steps
                # every rank takes part in the reduction (the global weighted mean was reduced above)
                last_loss = mean_across(loss, info) if global_loss is None else float(global_loss)
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"step {step}: loss is {last_loss}; "
                                             f"lower the lr or check the data")
                if main:
                    now = time.perf_counter()
                    rate = (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    record = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                              "steps_per_s": rate, "patches_per_s": rate * recipe.batch_size,
                              "time": time.time()}
                    if self.device.type == "cuda":
                        record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    _append_jsonl(metrics, record)
                    if tb is not None:
                        tb.add_scalar("train/loss", last_loss, step)
                        tb.add_scalar("train/lr", lr, step)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            bar.update()
            if main and cfg.val_every and (step % cfg.val_every == 0 or step == recipe.steps):
                val = self.validate()
                if val is not None:
                    _append_jsonl(metrics, {"step": step, "val_loss": val})
                    if tb is not None:
                        tb.add_scalar("val/loss", val, step)
            if main and cfg.snapshot_every and step % cfg.snapshot_every == 0:
                self.snapshot(step, x)
            if step % cfg.checkpoint_every == 0 or step == stop:
                self.save_checkpoint(step)
                barrier(info)
        bar.close()
        if tb is not None:
            tb.close()
        result: dict[str, Any] = {"step": step, "loss": last_loss, "run": str(self.out),
                                  "finished": step >= recipe.steps}
        if step >= recipe.steps and main:
            result.update(self.export())
        barrier(info)
        return result


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pre-training; returns ``{"step", "loss", "finished", "backbone", "nnssl", ...}``.

    Under ``torchrun`` every process calls this; rank 0 writes the run directory.

    Example:
        >>> pretrain(PretrainConfig(data="prep/", out="runs/tiny", recipe="s3d-b", architecture="tiny",
        ...                         steps=20, batch_size=2, patch_size=(32, 32, 32),
        ...                         method_kwargs={"block_size": 16}, workers=0))
        {'step': 20, ...}
    """
    run = _Run(cfg)
    try:
        return run.train()
    finally:
        cleanup(run.info)

