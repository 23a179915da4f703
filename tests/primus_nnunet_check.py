"""By-hand check: a Primus-M checkpoint in nnssl's layout -> local Hub server -> s3d -> nnU-Net's loaders.

Not part of the suite (Primus-M at 160^3 is 170 M parameters with the MAE decoder, and the reference
needs timm 1.0.16). It runs everything in the pinned reference environment, where DNA's Primus builds
(s3d runs on that timm too):

    pip install --target /work/ref-timm1016 --no-deps timm==1.0.16
    # nnU-Net master's pretrained trainers (not in the nnunetv2 2.8.1 release):
    git -C <MIC-DKFZ/nnUNet clone> archive HEAD nnunetv2 | tar -x -C /work/extra-primus/nnunet-master
    PYTHONPATH=/work/ref-timm1016:/work/extra-primus/nnunet-master:$PWD \
        /work/venv/bin/python tests/primus_nnunet_check.py

What it does, printing each result:

1. builds nnssl's Primus MAE checkpoint layout at 160^3 from DNA's parts (``down_projection``, ``eva``,
   ``up_projection`` with 1 channel, a 2-block decoder EVA, a learnt ``mask_token``; the adaptation
   plan of nnssl's ``BaseEvaMAETrainer``), seeded non-trivial weights, and serves it with
   tests/hub_server.py;
2. ``s3d.load_pretrained`` from that repo, then ``s3d convert REPO --to nnunet`` and ``--to nnssl``;
3. the nnU-Net export has the key/shape table of DNA's ``PrimusM(1, 1, (8, 8, 8), (160, 160, 160))``
   (tests/data/primus/primus_m_160_keys.json);
4. ``nnunetv2.run.load_pretrained_weights`` (``nnUNetv2_train -pretrained_weights``) accepts the export
   into DNA's ``PrimusM`` and every tensor arrives unchanged;
5. nnU-Net's ``PretrainedTrainer.load_pretrained_weights`` (what ``PretrainedTrainer_Primus`` fine-tunes
   with) loads the original checkpoint and s3d's nnssl export into ``PrimusM(2 -> 3 classes)`` at a
   128x128x96 patch; its stem, transformer and interpolated position embedding equal what
   ``s3d.load_pretrained(REPO, in_channels=2, num_classes=3, input_shape=(128, 128, 96))`` gives.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
REPO = "check-org/PrimusM-OpenMind-MAE"


def nnssl_mae_checkpoint() -> dict:
    from dynamic_network_architectures.architectures.primus import PrimusM
    from dynamic_network_architectures.building_blocks.eva import Eva

    torch.manual_seed(0)
    net = PrimusM(1, 1, (8, 8, 8), (160, 160, 160))
    decoder = Eva(embed_dim=864, depth=2, num_heads=12, ref_feat_shape=(20, 20, 20), init_values=0.1,
                  scale_attn_inner=True)
    g = torch.Generator().manual_seed(1)
    weights = {"mask_token": torch.randn(1, 1, 864, generator=g)}
    for prefix, module in (("", net), ("decoder.", decoder)):
        for k, v in module.state_dict().items():
            if k != "mask_token":  # norm scales and layer scales perturbed, so that no key mix-up hides
                weights[prefix + k] = v + 0.05 * torch.randn(v.shape, generator=g)
    plan = {
        "architecture_plans": {"arch_class_name": "PrimusM", "arch_kwargs": None, "arch_kwargs_requiring_import": None},
        "pretrain_plan": {"dataset_name": "Dataset745_OpenNeuro_v2", "plans_name": "nnsslPlans",
                          "configurations": {"onemmiso": {"spacing": [1, 1, 1], "patch_size": [160, 160, 160]}}},
        "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": [160, 160, 160],
        "key_to_encoder": "eva",
        "key_to_stem": "down_projection",
        "keys_to_in_proj": ["down_projection.proj"],
        "key_to_lpe": "eva.pos_embed",
    }
    return {"network_weights": weights, "optimizer_state": {}, "grad_scaler_state": None, "current_epoch": 1000,
            "init_args": {}, "trainer_name": "BaseEvaMAETrainer", "nnssl_adaptation_plan": plan}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="primus-check-"))
    os.environ["HF_HUB_CACHE"] = str(work / "hf")  # read when huggingface_hub is imported: set it first
    import timm

    if timm.__version__ != "1.0.16":
        sys.exit(f"run with timm 1.0.16 first on PYTHONPATH (found {timm.__version__}); see the docstring")
    from dynamic_network_architectures.architectures.primus import PrimusM
    from hub_server import HubServer
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.pretraining.pretrainedTrainer import PretrainedTrainer

    import s3d
    from s3d.cli import main as s3d_main

    t0 = time.time()
    ckpt = nnssl_mae_checkpoint()
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    server = HubServer().start()
    server.add_file(REPO, "checkpoint_final.pth", buf.getvalue())
    server.add_file(REPO, "adaptation_plan.json", json.dumps(ckpt["nnssl_adaptation_plan"]).encode())
    server.add_file(REPO, "config.json", b'{"architecture": "PrimusM"}')
    os.environ.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0")
    print(f"1. nnssl-layout Primus-M MAE checkpoint: {len(ckpt['network_weights'])} tensors, "
          f"{len(buf.getvalue()) / 2**20:.0f} MiB, served at {server.url}/{REPO}")

    model, report = s3d.load_pretrained(REPO, output_loading_info=True)
    print("2. s3d.load_pretrained:\n   " + report.summary().replace("\n", "\n   "))
    assert s3d_main(["convert", REPO, "--to", "nnunet", "-o", str(work / "pretrained_weights.pth")]) == 0
    assert s3d_main(["convert", REPO, "--to", "nnssl", "-o", str(work / "nnssl")]) == 0

    table = json.loads((ROOT / "tests" / "data" / "primus" / "primus_m_160_keys.json").read_text())["num_classes=1"]
    export = torch.load(work / "pretrained_weights.pth", weights_only=True)["network_weights"]
    assert [[k, list(v.shape)] for k, v in export.items()] == table
    print(f"3. the nnU-Net export has DNA PrimusM's 160^3 key/shape table ({len(table)} keys, same order)")

    dna = PrimusM(1, 1, (8, 8, 8), (160, 160, 160))
    load_pretrained_weights(dna, str(work / "pretrained_weights.pth"))
    got = dna.state_dict()
    assert all(torch.equal(got[k], v) for k, v in export.items())
    assert all(torch.equal(got[k], ckpt["network_weights"][k]) for k in got if k.startswith(("eva.", "down_proj")))
    print("4. nnunetv2.run.load_pretrained_weights accepted it into DNA's PrimusM; every tensor arrived unchanged")

    shape = (128, 128, 96)
    ours = s3d.load_pretrained(REPO, in_channels=2, num_classes=3, input_shape=shape).state_dict()
    for source in (str(work / "nnssl" / "checkpoint_final.pth"), None):
        path = source or str(work / "original.pth")
        if source is None:
            Path(path).write_bytes(buf.getvalue())
        target = PrimusM(2, 3, (8, 8, 8), shape)
        plan = ckpt["nnssl_adaptation_plan"]
        target, mismatch = PretrainedTrainer.load_pretrained_weights(
            target, path, pt_input_channels=1, downstream_input_channels=2, pt_input_patchsize=[160, 160, 160],
            downstream_input_patchsize=list(shape), pt_key_to_encoder=plan["key_to_encoder"],
            pt_key_to_stem=plan["key_to_stem"], pt_keys_to_in_proj=tuple(plan["keys_to_in_proj"]),
            pt_key_to_lpe=plan["key_to_lpe"])
        theirs = target.state_dict()
        keys = [k for k in theirs if k.startswith(("eva.", "down_projection."))]
        worst = max(float((theirs[k] - ours[k]).abs().max()) for k in keys)
        exact = sum(torch.equal(theirs[k], ours[k]) for k in keys)
        print(f"5. PretrainedTrainer.load_pretrained_weights({'s3d nnssl export' if source else 'original'}) into "
              f"PrimusM(2 -> 3) at {shape}: stem replicated={mismatch}; {exact}/{len(keys)} stem/transformer tensors "
              f"bitwise equal to s3d's, largest difference {worst:.3g}")
        assert worst <= 1e-6 * float(ours["eva.pos_embed"].abs().max())
    server.stop()
    shutil.rmtree(work)
    print(f"all checks passed in {time.time() - t0:.0f} s (timm {timm.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
