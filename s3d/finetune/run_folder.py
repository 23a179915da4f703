"""The run folder of a fine-tuning run: apart from its inputs, an earlier run refused or replaced, its config.

Everything here happens before the first file of the run is written: :func:`check_run_inputs` (the
folder can be written and does not overlap the dataset or a local pretrained model),
:func:`open_run_folder` (an earlier run there is refused, replaced with ``overwrite``, or resumed from
its checkpoint) and :func:`write_run_config` (``finetune_config.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from s3d._fs import write_json_atomic
from s3d.finetune.config import FinetuneConfig
from s3d.hub.sources import local_path
from s3d.runtime.checkpoint import check_resume, checkpoint_path, claim_run_folder, load_checkpoint


def check_run_inputs(cfg: FinetuneConfig, ds: Any) -> None:
    """Before anything is written: the run folder can be written and lies apart from the dataset and a local
    pretrained model; the dataset is one this loop can train (no ``ignore`` label yet).

    Raises:
        s3d._paths.UsageError: the run folder is, lies inside or holds an input.
        FileExistsError / PermissionError: a file where the run folder should be, or a read-only one.
        ValueError: an ``ignore`` label in ``dataset.json``.
    """
    from s3d._paths import check_apart, output_folder

    output_folder(cfg.out_dir, "run folder (-o/--out)")
    inputs: list[tuple[Any, str]] = [(cfg.dataset, "dataset folder")]
    local = None if cfg.pretrained is None else local_path(cfg.pretrained)
    if local is not None:  # a registry name that is also a folder (./s3d-demo) is the registered model
        inputs.append((local, "pretrained model (-p/--pretrained)"))
    check_apart(cfg.out_dir, "run folder (-o/--out)", inputs)
    if ds.ignore_label is not None:
        raise ValueError(f"{ds.root / 'dataset.json'}: label 'ignore' ({ds.ignore_label}): s3d finetune does not train "
                         "with an ignore label (sparse annotations) yet; its loss would learn 'ignore' as a class. "
                         "Remove the ignore label from dataset.json and relabel those voxels")


def open_run_folder(cfg: FinetuneConfig, job: str, export: str, main: bool = True) -> dict[str, Any] | None:
    """Claim ``cfg.out_dir`` for this run; returns the checkpoint to resume from (``cfg.resume``), else ``None``.

    A folder with an earlier run's checkpoints or ``export`` folder is refused unless ``cfg.resume`` (its
    checkpoint is loaded and its settings checked) or ``cfg.overwrite`` (rank 0 removes them, with
    ``split.json`` and ``metrics.jsonl``); see :func:`s3d.runtime.checkpoint.claim_run_folder`.

    Raises:
        FileExistsError / ResumeError / CheckpointError: as :func:`~s3d.runtime.checkpoint.claim_run_folder`,
            :func:`~s3d.runtime.checkpoint.check_resume` and :func:`~s3d.runtime.checkpoint.load_checkpoint`.

    Example:
        >>> state = open_run_folder(FinetuneConfig("Dataset001", "runs/a"), "finetune", "model")
    """
    out = Path(cfg.out_dir)
    if main or not cfg.overwrite:  # rank 0 alone removes an earlier run (overwrite)
        claim_run_folder(out, job=job, resume=cfg.resume, overwrite=cfg.overwrite, exports=(export,),
                         scratch=("split.json", "metrics.jsonl"))
    if not cfg.resume:
        return None
    state = load_checkpoint(out, job=job)
    check_resume(state["resume_fields"], cfg.resume_fields(), checkpoint_path(out))
    return state


def write_run_config(cfg: FinetuneConfig, world_size: int = 1) -> None:
    """Rank 0: the run folder and ``finetune_config.json`` (the settings and ``world_size``).

    Raises:
        OSError: one line naming the folder and ``-o/--out``.

    Example:
        >>> write_run_config(FinetuneConfig("Dataset001", "runs/a"))
    """
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "finetune_config.json", {**cfg.to_dict(), "world_size": world_size})
    except OSError as e:
        raise OSError(f"{out}: cannot write the run folder ({e.strerror or e}); choose another -o/--out, make it "
                      "writable or free disk space") from e
