"""Primus in s3d: build, run, token-sparse MAE, save, reload at another patch, export for nnU-Net.

    python examples/primus.py                               # primus_tiny, CPU, a few seconds
    python examples/primus.py --preset primus_m --size 160  # the OpenMind Primus-M (152 M parameters)

The registered OpenMind Primus-M checkpoints load the same way from the Hub:
``s3d.load_pretrained("primus-mae", in_channels=2, num_classes=3, input_shape=(128, 128, 96))``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import s3d
from s3d.hub.convert import convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="primus_tiny", help="primus_s/b/m/l or primus_tiny (default)")
    parser.add_argument("--size", type=int, default=32, help="training patch, voxels per axis (default 32)")
    args = parser.parse_args()

    patch = (args.size, args.size, args.size // 2)  # any size divisible by the token size
    net = s3d.build_primus(args.preset, in_channels=1, num_classes=2, input_shape=patch).eval()
    cfg = net.config
    print(f"{cfg.name}: {sum(p.numel() for p in net.parameters()):,} parameters, {cfg.embed_dim}-wide tokens of "
          f"{cfg.patch_embed_size} voxels, {cfg.eva_depth} blocks x {cfg.eva_numheads} heads, patch {cfg.input_shape} "
          f"= {cfg.num_tokens} tokens")
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = net(x)
    print(f"forward {tuple(x.shape)} -> {tuple(logits.shape)} in {time.perf_counter() - t0:.2f} s")

    # the encoder on a quarter of the tokens only (what token-sparse MAE pre-training runs)
    with torch.no_grad():
        tokens = net.embed(x)
        keep = torch.randperm(cfg.num_tokens, generator=torch.Generator().manual_seed(1))[: cfg.num_tokens // 4]
        visible = net.eva(tokens[:, keep], keep_index=keep[None])
        full = net.restore(visible, keep[None])  # zeros (the mask token) at the masked tokens
    print(f"visible tokens only: {tuple(visible.shape)}; restored to the grid: {tuple(full.shape)}")

    # token-sparse MAE pre-training (what `s3d pretrain --arch primus_m` trains) and the fine-tuning optimiser
    from s3d.finetune import get_schedule
    from s3d.finetune.phases import make_optimizer
    from s3d.sparse import PrimusMAEWrapper

    mae = PrimusMAEWrapper(s3d.build_primus(args.preset, in_channels=1, num_classes=1, input_shape=patch))
    out = mae(x, generator=torch.Generator().manual_seed(2))
    print(f"MAE: loss {float(out.loss):.3f} on the {int((~out.mask).sum())} masked of {cfg.num_tokens} tokens")
    opt = make_optimizer(get_schedule("primus"), list(net.parameters()), lr=1e-4)
    print(f"fine-tuning preset 'primus': {type(opt).__name__}, betas {opt.defaults['betas']}, "
          f"weight decay {opt.defaults['weight_decay']}")

    with tempfile.TemporaryDirectory() as tmp:
        saved = s3d.save_pretrained(net, Path(tmp) / "primus")
        # another patch and 2 input channels: position embedding interpolated, patch embedding replicated
        bigger = (patch[0], patch[1], patch[2] * 2)
        model, report = s3d.load_pretrained(saved, in_channels=2, input_shape=bigger, output_loading_info=True)
        print("reloaded:\n  " + report.summary().replace("\n", "\n  "))
        paths, _ = convert(saved, "nnunet", Path(tmp) / "pretrained_weights.pth")
        exported = torch.load(paths[0], weights_only=True)["network_weights"]
        print(f"nnU-Net export (-pretrained_weights): {len(exported)} tensors with DNA's Primus keys, e.g. "
              f"{next(iter(exported))}, eva.pos_embed {tuple(exported['eva.pos_embed'].shape)}")
    print(f"the reloaded model takes {tuple(model.config.input_shape)} inputs with {model.config.in_channels} channels")


if __name__ == "__main__":
    main()
