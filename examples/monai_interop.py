"""An s3d ResEnc U-Net is a plain ``nn.Module``: train it with MONAI's ``DiceCELoss`` and predict with
MONAI's ``sliding_window_inference``, next to s3d's own ``sliding_window_predict``.

A synthetic volume (a bright sphere in noise) stands in for data; the network is freshly built
(or loaded from a model directory / Hub name with ``--model``). Needs MONAI: ``pip install monai``.

    python examples/monai_interop.py                 # tiny network, 40 steps, about 30 s on 1 CPU thread
    python examples/monai_interop.py --model runs/Dataset001/model --steps 0
"""

import argparse
import time

import torch

import s3d
from s3d.infer import sliding_window_predict

try:
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
except ImportError as e:
    raise SystemExit("this example needs MONAI: pip install monai") from e

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="model directory or name for s3d.hub.load_pretrained")
parser.add_argument("--steps", type=int, default=40, help="training steps with MONAI's DiceCELoss")
parser.add_argument("--size", type=int, default=64, help="synthetic volume edge, voxels")
args = parser.parse_args()
torch.manual_seed(0)

# 1. A network: freshly built or loaded; either way a torch.nn.Module with forward(x) -> logits.
if args.model:
    from s3d.hub import load_pretrained

    net = load_pretrained(args.model, in_channels=1, num_classes=2, strict=False)
else:
    net = s3d.build_resenc_unet("tiny", in_channels=1, num_classes=2)
print(f"{type(net).__name__} ({net.config.name}): {sum(p.numel() for p in net.parameters()):,} parameters")

# 2. Synthetic data: a sphere of radius size/4 (label 1) brighter than the noisy background.
n = args.size
grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))
label = (((grid - n / 2) ** 2).sum(0) < (n / 4) ** 2).long()[None, None]  # (1, 1, D, H, W)
image = label.float() + 0.5 * torch.randn(1, 1, n, n, n)
image = (image - image.mean()) / image.std()

# 3. Train with MONAI's loss on random 32^3 crops (SGD as nnU-Net).
loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
net.train()
t0 = time.perf_counter()
for step in range(args.steps):
    z, y, x = torch.randint(0, n - 32 + 1, (3,)).tolist()
    crop = (..., slice(z, z + 32), slice(y, y + 32), slice(x, x + 32))
    loss = loss_fn(net(image[crop]), label[crop])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    opt.step()
    if step % 10 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  DiceCE loss {loss.item():.3f}")
if args.steps:
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s")
net.eval()


def dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
    p, r = pred.bool(), ref.bool()
    return float(2 * (p & r).sum() / (p.sum() + r.sum()).clamp_min(1))


# 4. Predict the whole volume with MONAI's and with s3d's sliding window (Gaussian, 50% overlap).
with torch.inference_mode():
    monai_logits = sliding_window_inference(image, (32, 32, 32), 4, net, overlap=0.5, mode="gaussian")
s3d_logits = sliding_window_predict(net, image, (32, 32, 32), step=0.5, tile_batch=4)
monai_logits = monai_logits.as_tensor() if hasattr(monai_logits, "as_tensor") else monai_logits
for name, logits in (("MONAI sliding_window_inference", monai_logits),
                     ("s3d sliding_window_predict", s3d_logits)):
    d = dice(logits.argmax(1), label[:, 0])
    print(f"{name}: logits {tuple(logits.shape)}, Dice vs the sphere {d:.3f}")
agree = float((monai_logits.argmax(1) == s3d_logits.argmax(1)).float().mean())
print(f"voxels with the same label in both: {agree:.2%}")
