"""Build the paper's ResEnc-L U-Net, count its parameters and FLOPs, and run one forward pass.

    python examples/build_model.py            # resenc_l at 64^3 (about 2 s on 2 CPU cores)
    python examples/build_model.py --config tiny --size 32
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import s3d

parser = argparse.ArgumentParser()
parser.add_argument("--config", default="resenc_l")
parser.add_argument("--size", type=int, default=64, help="cube edge in voxels (multiple of 32 for resenc_l)")
args = parser.parse_args()

net = s3d.build_resenc_unet(args.config, in_channels=1, num_classes=2).eval()
n_enc = sum(p.numel() for p in net.encoder.parameters())
n_dec = sum(p.numel() for p in net.decoder.parameters())
print(f"{args.config}: {n_enc + n_dec:,} parameters (encoder {n_enc / 1e6:.2f} M, decoder {n_dec / 1e6:.2f} M)")
print("config.json:", net.config.to_json(indent=None))

x = torch.randn(1, 1, args.size, args.size, args.size)
with torch.no_grad(), FlopCounterMode(display=False) as flops:
    y = net(x)
print(f"input {tuple(x.shape)} -> logits {tuple(y.shape)}")
print(f"forward: {flops.get_total_flops() / 1e12:.3f} TFLOP (2 x multiply-adds of convs)")
scale = (160 / args.size) ** 3
print(f"scaled to one 160^3 patch: {flops.get_total_flops() * scale / 1e12:.2f} TFLOP")
