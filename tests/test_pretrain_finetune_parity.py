"""Between pre-training and fine-tuning nothing changes but the task (issue 25's checks).

The same image prepared for pre-training (``s3d pretrain``) and preprocessed for fine-tuning
(``s3d finetune``) is the same array, also when it must be resampled from thick slices; the encoder a
fine-tuning run starts from is, tensor for tensor, the one the masked autoencoder trained; and the
masked encoder with every cell visible is the dense encoder fine-tuning runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")


@pytest.mark.parametrize("spacing", [(3.5, 3.5, 3.5), (1.0, 1.0, 3.0)], ids=["as_is", "thick_slices"])
def test_pretraining_preparation_equals_finetuning_preprocessing(tmp_path, spacing) -> None:
    from s3d.data.io import read_nifti, write_nifti
    from s3d.data.nnunet import PreprocessingSpec, read_dataset_json
    from s3d.data.nnunet.preprocessing import preprocess_case
    from s3d.data.scan.prepared import preprocess_image

    rng = np.random.default_rng(0)
    img = np.zeros((30, 34, 16), np.float32)
    img[3:-3, 4:-4, 2:-2] = rng.gamma(2.0, 50.0, (24, 26, 12))  # a zero border: both crop it away
    ds = tmp_path / "ds"
    write_nifti(ds / "imagesTr" / "c_0000.nii.gz", img, np.diag([*spacing, 1.0]))
    write_nifti(ds / "labelsTr" / "c.nii.gz", np.zeros_like(img), np.diag([*spacing, 1.0]))
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1},
                                                 "numTraining": 1, "file_ending": ".nii.gz"}))
    target = 1.5
    spec = PreprocessingSpec.from_dataset(read_dataset_json(ds), target_spacing_mm=(target,) * 3)
    finetune, _ = preprocess_case([ds / "imagesTr" / "c_0000.nii.gz"], spec)
    data, header = read_nifti(ds / "imagesTr" / "c_0000.nii.gz")
    pretrain, _ = preprocess_image(data[None], header.spacing_mm, target)
    assert finetune.shape == pretrain.shape and finetune.shape[1:] == tuple(
        round(n * s / target) for n, s in zip((24, 26, 12), spacing, strict=True))
    assert np.array_equal(finetune, pretrain)  # one code path: crop, z-score, resample


def test_finetuning_starts_from_the_encoder_the_mae_trained(tmp_path) -> None:
    from s3d import build_resenc_unet, save_pretrained
    from s3d.finetune import prepare_model
    from s3d.sparse import SparseMAEWrapper

    torch.manual_seed(0)
    mae = SparseMAEWrapper(build_resenc_unet("tiny", in_channels=1, num_classes=1), block_size=16, engine="dense")
    opt = torch.optim.SGD(mae.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 1, 32, 32, 32)
    init = {k: v.clone() for k, v in mae.backbone.state_dict().items()}
    for _ in range(3):  # move every weight away from its initialisation
        opt.zero_grad()
        mae(x).loss.backward()
        opt.step()
    backbone = build_resenc_unet(mae.backbone.config)
    backbone.load_state_dict(mae.export_backbone())
    save_pretrained(backbone, tmp_path / "w")
    trained = {k: v for k, v in mae.backbone.state_dict().items() if k.startswith("encoder.")}
    for strategy in ("all", "encoder"):
        net = prepare_model(str(tmp_path / "w"), in_channels=1, num_classes=4, strategy=strategy, config="tiny")
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in trained.items()), strategy
    assert not any(torch.equal(init[k], v) for k, v in trained.items() if k.endswith("conv.weight"))


def test_masked_encoder_with_every_cell_visible_is_the_dense_encoder() -> None:
    from s3d import build_resenc_unet
    from s3d.nn.masked import stage_keeps

    torch.manual_seed(0)
    net = build_resenc_unet("tiny", in_channels=1, num_classes=1)
    x = torch.randn(2, 1, 32, 48, 32)
    keeps = stage_keeps(torch.ones(2, 1, 2, 3, 2), x.shape[2:], net.config.stage_strides())
    with torch.no_grad():
        ref = [f.double() for f in net.double().encoder(x.double())]  # float64 reference
        net.float()
        dense, masked = net.encoder(x), net.encoder(x, keeps)
    for d, m, r in zip(dense, masked, ref, strict=True):
        # yardstick: the masked path's error against float64 is at most a few times the dense path's
        dense_err = float((d.double() - r).abs().max())
        assert float((m.double() - r).abs().max()) <= 4 * dense_err + 1e-12
