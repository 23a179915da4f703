"""A Primus from the Hub (nnssl's MAE layout) -> load_pretrained -> s3d finetune -> s3d predict -> s3d convert.

The acceptance path of issue 24: the checkpoint is built to the public files' structure
(tests/test_primus_hub.py) and served by the local Hub server; the fine-tuned network is exported to
nnU-Net's layout and its key/shape table compared with the one DNA's Primus wrote
(tests/data/primus/small.safetensors, same configuration: 1 channel, 3 classes, patch (8, 12, 8)).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hub_server import HubServer
from test_infer import _reference
from test_nnunet_data import make_sphere_dataset, write_nifti
from test_primus_hub import DATA, REPO, nnssl_mae_checkpoint, publish

from s3d.cli import main
from s3d.finetune import FinetuneConfig, Trainer, get_schedule
from s3d.hub import load_pretrained
from s3d.nn.primus import Primus

PATCH = (8, 12, 8)  # the checkpoint's pre-training patch: the position embedding comes over unchanged


def _two_label_dataset(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """Spheres (one channel) whose lower-x half is label 2: three classes, as the reference fixture's network."""
    make_sphere_dataset(root, n=n, size=size, channels=1, seed=seed)
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(str(path))
        seg = np.asarray(img.dataobj).astype(np.uint8)
        seg[..., : size // 2][seg[..., : size // 2] == 1] = 2
        write_nifti(path, seg, img.affine)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "sphere": 1, "half": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _starts(size: int, patch: int, step: float = 0.5) -> list[int]:
    """nnU-Net's window starts: ceil((size - patch) / (patch * step)) + 1 evenly spaced, rounded."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * step)) + 1
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


@pytest.fixture()
def published(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # the CLI uses the default cache
    ckpt = nnssl_mae_checkpoint()
    publish(hub, ckpt)
    return ckpt["network_weights"]


def test_primus_recipe_trains_the_decoder_first_with_adamw(published: dict, tmp_path: Path) -> None:
    ds = _two_label_dataset(tmp_path / "ds", n=4, size=20)
    loaded = load_pretrained(REPO, in_channels=1, num_classes=3, cache_dir=tmp_path / "hf")
    cfg = FinetuneConfig(str(ds), str(tmp_path / "run"), pretrained=REPO, schedule="primus_decoder_warmup", steps=3,
                         warmup_steps=1, patch_size=PATCH, val_every=100, checkpoint_every=100, device="cpu",
                         progress=False, final_validation=False, loader_threads=0)
    tr = Trainer(cfg)
    assert isinstance(tr.model, Primus) and tr.model.config.input_shape == PATCH and tr.patch_size == PATCH
    start = {k: v.clone() for k, v in tr.model.state_dict().items()}
    encoder = [k for k in start if k.startswith(("down_projection.", "eva."))]
    for key in encoder:  # the checkpoint's encoder, bit for bit (1 channel, same patch: nothing adapted)
        assert torch.equal(start[key], published[key]) and torch.equal(start[key], loaded.state_dict()[key]), key
    tr.train_step()  # warm-up 1: up_projection only
    opt = tr.optimizer
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["lr"]) == ((0.9, 0.98), 5e-2, 1e-4)  # ramp of 1 step: peak
    assert {id(p) for p in group["params"]} == {id(p) for p in tr.model.up_projection.parameters()}
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in encoder)
    assert all(not torch.equal(after[k], start[k]) for k in start if k.startswith("up_projection."))
    tr.train_step()  # warm-up 2: every weight
    assert {id(p) for p in tr.optimizer.param_groups[0]["params"]} == {id(p) for p in tr.model.parameters()}
    q = "eva.blocks.0.attn.q_proj.weight"
    assert not torch.equal(tr.model.state_dict()[q], start[q])
    tr.save_checkpoint()  # a resumed run rebuilds the Primus from the checkpoint and continues with AdamW
    again = Trainer(dataclasses.replace(cfg, resume=True))
    assert isinstance(again.model, Primus) and again.step == 2
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in tr.model.state_dict().items())
    assert isinstance(again.optimizer, torch.optim.AdamW)
    assert again.optimizer.state_dict()["state"].keys() == tr.optimizer.state_dict()["state"].keys()
    scratch = get_schedule("primus_scratch")
    assert (scratch.transfer, scratch.peak_lr, scratch.optimizer) == ("none", 3e-4, "adamw")
    assert scratch.default_weight_decay == 5e-2 and get_schedule("best").default_weight_decay == 3e-5
    # weight_decay=None resolves to the optimiser's default, so checkpoints that saved SGD's 3e-5 still resume
    assert FinetuneConfig("ds", "out").resume_fields()["weight_decay"] == 3e-5
    assert FinetuneConfig("ds", "out", schedule="primus", steps=100).resume_fields()["weight_decay"] == 5e-2


def test_primus_from_the_hub_finetunes_predicts_and_exports(published: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from s3d.data.nnunet import preprocess_case, restore_geometry
    from s3d.infer.cases import load_model_dir

    ds = _two_label_dataset(tmp_path / "ds", n=4, size=20)
    run = tmp_path / "run"
    assert main(["finetune", str(ds), "-o", str(run), "-p", REPO, "--schedule", "primus", "--steps", "2",
                 "--warmup-steps", "1", "--patch-size", *map(str, PATCH), "--val-every", "2", "--checkpoint-every", "2",
                 "--device", "cpu", "--no-progress", "--loader-threads", "0"]) == 0, capsys.readouterr().err
    model_dir = run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "Primus" and tuple(config["architecture"]["input_shape"]) == PATCH
    state = torch.load(run / "checkpoint_latest.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)

    # s3d predict equals a slow sliding window (one window at a time, all 8 mirrorings, float64 sums)
    test = _two_label_dataset(tmp_path / "test", n=1, size=20, seed=7)
    image_path = test / "imagesTr" / "case000_0000.nii.gz"
    assert main(["predict", "-i", str(test / "imagesTr"), "-o", str(tmp_path / "pred"), "-m", str(model_dir),
                 "--device", "cpu", "--no-progress", "--save-probabilities"]) == 0, capsys.readouterr().err
    ours = np.asarray(nib.load(str(tmp_path / "pred" / "case000.nii.gz")).dataobj)
    model, spec = load_model_dir(model_dir)
    image, props = preprocess_case([image_path], spec, constant_channels="zero")
    flips = [c for r in range(4) for c in itertools.combinations(range(3), r)]
    starts = [_starts(s, p) for s, p in zip(image.shape[1:], PATCH, strict=True)]
    logits = _reference(model, image, PATCH, starts, flips)
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    ref_probs = restore_geometry(probs, props)
    saved = np.load(tmp_path / "pred" / "case000.npz")["probabilities"]
    # both are sums of the same float32 forwards; ours adds in float32 (at most 8 windows x 8 flips per voxel) and
    # batches tiles: a float32 rounding bound with room, 2^10 eps, on probabilities in [0, 1]
    err = float(np.abs(saved - ref_probs).max())
    assert err <= 1024 * np.finfo(np.float32).eps
    top2 = np.sort(ref_probs, axis=0)[-2:]
    decided = top2[1] - top2[0] > 2 * err  # labels can differ only where the two best classes are within the error
    ref_labels = ref_probs.argmax(0)
    assert decided.mean() > 0.99 and np.array_equal(ours[decided], ref_labels[decided])

    # s3d convert --to nnunet: DNA's key and shape table of the same configuration
    assert main(["convert", str(model_dir), "--to", "nnunet", "-o", str(tmp_path / "w.pth")]) == 0
    exported = torch.load(tmp_path / "w.pth", weights_only=True)["network_weights"]
    from safetensors.torch import load_file

    reference = {k[len("weight."):]: v for k, v in load_file(str(DATA / "small.safetensors")).items()
                 if k.startswith("weight.")}
    assert [(k, tuple(v.shape)) for k, v in sorted(exported.items())] == \
        [(k, tuple(v.shape)) for k, v in sorted(reference.items())]
    final = load_pretrained(model_dir)
    assert all(torch.equal(exported[k], v) for k, v in final.state_dict().items())


def test_scratch_primus_takes_the_patch_as_input_shape_and_tiles_must_fit() -> None:
    from s3d.finetune import prepare_model
    from s3d.infer.cases import PatchSizeError, check_patch_size

    torch.manual_seed(0)
    model = prepare_model(None, in_channels=2, num_classes=4, config="primus_tiny", input_shape=(16, 32, 8))
    assert isinstance(model, Primus) and model.config.input_shape == (16, 32, 8)
    assert (model.config.in_channels, model.config.num_classes) == (2, 4)
    assert check_patch_size((16, 32, 8), model) == (16, 32, 8)
    with pytest.raises(PatchSizeError, match=r"exactly its training patch \(16, 32, 8\)"):
        check_patch_size((32, 32, 32), model)
