"""Load pretrained weights, adapt them to a new task, save and convert them.

Runs offline on CPU with a tiny network saved locally; replace ``source`` by ``"s3d-b"`` (or any
name from ``s3d models``) to fetch the real ResEnc-L weights from the Hugging Face Hub.

    python examples/load_pretrained.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import s3d
from s3d.hub import list_models, load_pretrained, save_pretrained
from s3d.hub.convert import convert


def main() -> None:
    for entry in list_models():
        print(f"{entry.name:30s} {entry.repo_id:38s} {entry.license:10s} {entry.provenance[:60]}...")

    with tempfile.TemporaryDirectory() as tmp:
        # stand-in for a pretrained checkpoint: a 1-channel tiny network
        source = save_pretrained(s3d.build_resenc_unet("tiny", num_classes=1), Path(tmp) / "pretrained")

        # a 2-modality, 4-class task: stem replicated over channels, new segmentation heads
        model, report = load_pretrained(source, in_channels=2, num_classes=4, output_loading_info=True)
        print(report.summary())
        x = torch.randn(1, 2, 32, 32, 32)
        with torch.no_grad():
            print("logits", tuple(model(x).shape))

        # encoder-only transfer (fresh decoder), then export for nnU-Net's -pretrained_weights
        encoder_only = load_pretrained(source, in_channels=2, num_classes=4, decoder=False)
        save_pretrained(encoder_only, Path(tmp) / "finetuned")
        paths, _ = convert(Path(tmp) / "finetuned", "nnunet", Path(tmp) / "nnunet.pth")
        print("wrote", [p.name for p in paths])


if __name__ == "__main__":
    main()
