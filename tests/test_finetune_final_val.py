"""Fine-tuning's final validation: Gaussian-weighted sliding windows (as ``s3d predict``), logged once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from test_nnunet_data import make_sphere_dataset  # noqa: E402

from s3d.finetune import FinetuneConfig, Trainer  # noqa: E402
from s3d.finetune.validation import predict_tiled  # noqa: E402
from s3d.infer import sliding_window_predict  # noqa: E402


def _cfg(tmp_path: Path, name: str, **kw) -> FinetuneConfig:
    base = dict(dataset=str(tmp_path / "ds"), out_dir=str(tmp_path / name), config="tiny", batch_size=2,
                patch_size=(32, 32, 32), schedule="scratch", steps=3, augment=False, val_every=1000,
                checkpoint_every=1000, progress=False, seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


def _records(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def ds40(tmp_path: Path) -> Path:
    """Cases of 40^3 voxels with 32^3 patches: tiles (pad to 64^3) and sliding windows (starts 0, 8) differ."""
    return make_sphere_dataset(tmp_path / "ds", n=4, size=40)


def test_final_validation_is_sliding_window_dice_logged_once(tmp_path: Path, ds40: Path) -> None:
    tr = Trainer(_cfg(tmp_path, "run"))
    tr.fit()
    recs = _records(tmp_path, "run")
    finals = [r for r in recs if r.get("val_mode") == "sliding_window"]
    assert len(finals) == 1 and recs[-1] is finals[0]                       # once, at the very end
    final = finals[0]
    assert final["step"] == 3 and tr.final_val == final
    tiled = [r for r in recs if "val_dice" in r]
    assert [(r["step"], r["val_mode"]) for r in tiled] == [(3, "tiles")]     # the periodic one stays tiled

    # independent reference: s3d.infer's argmax on every held-out case, Dice by the formula
    model = tr.model.eval()                                                  # deep supervision still on
    ref, ref_tiled = [], []
    assert len(tr.val_cases) == 1
    for case in tr.val_cases:
        image = torch.from_numpy(np.array(case.data, dtype=np.float32))
        pred = sliding_window_predict(model, image, (32, 32, 32), step=0.5, gaussian=True,
                                      sigma_scale=1 / 8).argmax(0).numpy()
        seg = np.asarray(case.seg) == 1
        p = pred == 1
        ref.append(2.0 * np.logical_and(p, seg).sum() / (p.sum() + seg.sum()))
        tiles = predict_tiled(model, np.asarray(case.data), (32, 32, 32), torch.device("cpu")) == 1
        ref_tiled.append(2.0 * np.logical_and(tiles, seg).sum() / (tiles.sum() + seg.sum()))
        assert (tiles != p).sum() > 0                                        # this case tells them apart
    # the same predictions (same function, same arguments), float64 Dice of integer counts, averaged: equal
    # up to ~1e-16; rel 1e-12 allows another summation order
    assert final["final_dice"] == pytest.approx(float(np.mean(ref)), rel=1e-12, abs=0)
    assert final["final_dice_per_label"] == {"1": pytest.approx(float(np.mean(ref)), rel=1e-12, abs=0)}
    assert tiled[-1]["val_dice"] == pytest.approx(float(np.mean(ref_tiled)), rel=1e-12, abs=0)
    assert final["final_dice"] != tiled[-1]["val_dice"]                      # not the tiled predictor
    assert tr.model.deep_supervision

    # resuming the finished run does not validate (or log) again
    again = Trainer(_cfg(tmp_path, "run", resume=True))
    again.fit()
    assert _records(tmp_path, "run") == recs and again.final_val == final


def test_final_validation_switch_off_then_resumed_on(tmp_path: Path, ds40: Path) -> None:
    tr = Trainer(_cfg(tmp_path, "off", steps=2, final_validation=False))
    tr.fit()
    recs = _records(tmp_path, "off")
    assert tr.final_val is None and not any("final_dice" in r for r in recs)
    assert [r["step"] for r in recs if "val_dice" in r] == [2]
    # the finished run resumed with the switch on: the final validation runs, once
    on = Trainer(_cfg(tmp_path, "off", steps=2, final_validation=True, resume=True))
    on.fit()
    recs = _records(tmp_path, "off")
    assert [r["step"] for r in recs if "final_dice" in r] == [2] and recs[-1] == on.final_val
