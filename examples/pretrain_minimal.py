"""Minimal sparse-MAE pre-training: build a ResEnc U-Net, wrap it, take a few optimiser steps.

Runs on CPU in well under a minute with the tiny preset; use ``"resenc_l"`` and 160^3 patches of
z-scored 1 mm images (recipe ``s3d-b``) for the paper's setting.
"""

import torch

import s3d
from s3d.runtime.lr import lr_at

recipe = s3d.pretrain.get_recipe("s3d-b").replace(steps=5, batch_size=2, patch_size=(64, 64, 64))
net = s3d.build_resenc_unet("tiny", in_channels=1, num_classes=1)  # head reconstructs the image
mae = s3d.pretrain.build_method(recipe.method, net, **recipe.method_kwargs)  # sparse MAE: 32^3 blocks, U[0.6, 0.9]
opt = torch.optim.SGD(mae.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                      weight_decay=recipe.weight_decay)
gen = torch.Generator().manual_seed(0)

for step in range(recipe.steps):
    for group in opt.param_groups:
        group["lr"] = lr_at(recipe.lr_phases(), step)  # per-step PolyLR, a function of the step
    x = torch.randn(recipe.batch_size, 1, *recipe.patch_size, generator=gen)  # stand-in for z-scored patches
    out = mae(x, generator=gen)  # out.loss: MSE on masked voxels; out.mask: (B, 1, 2, 2, 2), 1 = visible
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(mae.parameters(), recipe.grad_clip)
    opt.step()
    print(f"step {step}: loss {out.loss.item():.4f}, masked {1 - out.mask.float().mean().item():.2f}")

state = mae.export_backbone()  # loads strictly into s3d.build_resenc_unet(net.config)
s3d.build_resenc_unet(net.config).load_state_dict(state)
