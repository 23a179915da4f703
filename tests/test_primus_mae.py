"""Token-sparse MAE of Primus: the visible-only encoder against attention restricted to the visible keys, the loss
against its formula, and ``s3d pretrain --arch primus_tiny`` through the one loop, checkpoints and export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import s3d
from s3d.nn.primus import PrimusConfig
from s3d.pretrain import build_backbone, build_method
from s3d.runtime.checkpoint import load_checkpoint
from s3d.sparse import MAEOutput, PrimusMAEWrapper, sample_token_keep

SMALL = PrimusConfig(embed_dim=48, eva_depth=2, eva_numheads=2, patch_embed_size=(4, 4, 2), input_shape=(8, 12, 8),
                     in_channels=1, num_classes=1)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (layer scale, norms, position embeddings, mask token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2
                    + (1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0))


def _masked_attention_encoder(eva: torch.nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The full token sequence through the EVA with every query attending to the visible keys only.

    timm's EvaBlock takes an additive ``attn_mask``: -inf on the masked keys. Masked tokens are still updated
    (as queries) but never read, so the visible rows must equal the visible-only encoder's.
    """
    b, n, _ = tokens.shape
    x = tokens + eva.pos_embed
    bias = torch.zeros(b, 1, n, n, dtype=tokens.dtype)
    bias.masked_fill_(~keep[:, None, None, :], float("-inf"))
    for block in eva.blocks:
        x = block(x, rope=eva.rope, attn_mask=bias)
    return eva.norm(x)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_visible_only_encoder_equals_attention_restricted_to_visible_keys(ratio: float) -> None:
    net = s3d.build_primus(SMALL).double()
    _randomize(net, 1)
    x = torch.randn(3, 1, *SMALL.input_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep_index = sample_token_keep(3, SMALL.num_tokens, ratio, torch.Generator().manual_seed(3))
    n = SMALL.num_tokens
    assert keep_index.shape == (3, n - round(n * ratio))
    keep = torch.zeros(3, n, dtype=torch.bool).scatter_(1, keep_index, True)
    mae = PrimusMAEWrapper(net).double()
    with torch.no_grad():
        tokens = net.embed(x)
        ours = mae.encode(tokens, keep_index)                       # (B, K, E): the visible tokens only
        full = _masked_attention_encoder(net.eva, tokens, keep)      # (B, N, E)
        ref = full.gather(1, keep_index[:, :, None].expand(-1, -1, full.shape[-1]))
        # a float32 run of the same comparison is the yardstick for rounding
        net32, mae32 = s3d.build_primus(SMALL), None
        net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
        mae32 = PrimusMAEWrapper(net32)
        ours32 = mae32.encode(net32.embed(x.float()), keep_index).double()
        # everything else of the sequence (all keys visible) differs: the masked keys really are left out
        plain = net.eva(tokens).gather(1, keep_index[:, :, None].expand(-1, -1, full.shape[-1]))
    err64 = float((ours - ref).abs().max())
    err32 = float((ours32 - ref).abs().max())
    assert err64 <= 1e3 * torch.finfo(torch.float64).eps * float(ref.abs().max())  # float64 round-off only
    assert err32 > 0 and err64 < err32 * 1e-6  # far below float32's rounding: the same function
    assert float((plain - ref).abs().max()) > 1e3 * err32


def test_loss_is_the_mse_over_masked_patches_and_the_output_type_is_maes() -> None:
    net = s3d.build_primus(SMALL).double()
    _randomize(net, 4)
    mae = PrimusMAEWrapper(net, mask_ratio=0.75).double()
    _randomize(mae, 5)
    x = torch.randn(2, 1, *SMALL.input_shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    keep_index = sample_token_keep(2, SMALL.num_tokens, 0.75, torch.Generator().manual_seed(7))
    out = mae(x, keep_index=keep_index)
    assert isinstance(out, MAEOutput) and out.mask.shape == (2, 1, *SMALL.grid) and out.mask.dtype == torch.bool
    # the formula, per token: mean over the voxels of masked tokens of (reconstruction - x)^2
    rec = out.reconstruction.detach()
    pd, ph, pw = SMALL.patch_embed_size
    d, h, w = SMALL.grid

    def tokens_of(v: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W) -> (B, N, voxels per token), grid order
        return v.reshape(2, d, pd, h, ph, w, pw).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, d * h * w, -1)

    sq = (tokens_of(rec) - tokens_of(x)) ** 2
    masked = torch.ones(2, SMALL.num_tokens, dtype=torch.bool).scatter_(1, keep_index, False)
    expected = sq[masked].mean()
    n_masked_voxels = int(masked.sum()) * pd * ph * pw
    assert float(out.loss_weight) == n_masked_voxels
    # fp32 loss of float64 tensors: within float32 rounding of the sum
    bound = 4 * n_masked_voxels * torch.finfo(torch.float32).eps * float(expected)
    assert abs(float(out.loss.detach()) - float(expected)) <= bound
    assert mae.keep_grid(keep_index).view(2, -1).sum(1).tolist() == [keep_index.shape[1]] * 2
    # the decoder is nnssl's EvaMAE layout: mask_token and decoder.* beside the backbone
    keys = set(mae.state_dict())
    assert "mask_token" in keys and "decoder.pos_embed" in keys and "decoder.blocks.1.attn.q_proj.weight" in keys
    assert "decoder.blocks.2.attn.q_proj.weight" not in keys  # depth 2


def test_patch_problem_and_method_registry() -> None:
    backbone = build_backbone("primus_tiny", (16, 16, 16))
    assert isinstance(backbone, s3d.Primus) and backbone.config.input_shape == (16, 16, 16)
    with pytest.warns(UserWarning, match=r"ignoring the ResEnc-only method_kwargs \['block_size', 'coarse'\]"):
        mae = build_method("mae", backbone, block_size=16, coarse="pool", mask_ratio=[0.6, 0.9])
    assert isinstance(mae, PrimusMAEWrapper) and mae.mask_ratio == (0.6, 0.9)
    assert mae.patch_problem((16, 16, 16)) is None
    assert mae.patch_problem((32, 32, 32)).fix_patch_size == (16, 16, 16)
    with pytest.raises(ValueError, match="ResEnc U-Net only"):
        build_method("mg", backbone)
    sizes = {sample_token_keep(4, 64, (0.6, 0.9), torch.Generator().manual_seed(s)).shape[1] for s in range(20)}
    assert min(sizes) >= 64 - math.floor(64 * 0.9 + 0.5) and max(sizes) <= 64 - round(64 * 0.6) and len(sizes) > 1



def test_s3d_pretrain_arch_primus_runs_the_loop_checkpoints_and_exports(prepared: Path, tmp_path: Path) -> None:
    from s3d.cli import main
    from s3d.hub import load_pretrained

    run = tmp_path / "run"
    args = ["pretrain", "--data", str(prepared), "--out", str(run), "--arch", "primus_tiny", "--steps", "3",
            "--batch-size", "2", "--patch-size", "16", "--workers", "0", "--device", "cpu", "--checkpoint-every",
            "2", "--val-every", "0", "--snapshot-every", "0", "--no-progress", "--val-fraction", "0.2"]
    with pytest.warns(UserWarning, match="ResEnc-only method_kwargs"):
        assert main(args) == 0
    ckpt = load_checkpoint(run, job="pretrain")
    assert ckpt["step"] == 3 and "mask_token" in ckpt["model"] and "decoder.pos_embed" in ckpt["model"]
    backbone = load_pretrained(run / "backbone")
    assert isinstance(backbone, s3d.Primus) and backbone.config.input_shape == (16, 16, 16)
    trained = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in trained.items())
    plan = json.loads((run / "nnssl" / "adaptation_plan.json").read_text())
    assert plan["key_to_encoder"] == "eva" and plan["recommended_downstream_patchsize"] == [16, 16, 16]


def test_torchrun_two_processes_pretrain_a_primus(prepared: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "s3d",
           "pretrain", "--data", str(prepared), "--out", str(run), "--arch", "primus_tiny", "--steps", "2",
           "--batch-size", "2", "--patch-size", "16", "--method-kwargs", '{"mask_ratio": 0.75}', "--workers", "0",
           "--device", "cpu", "--checkpoint-every", "2", "--val-every", "0", "--snapshot-every", "0",
           "--no-progress", "--val-fraction", "0.2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(run, job="pretrain")
    assert ckpt["step"] == 2 and ckpt["data"]["world_size"] == 2 and ckpt["data"]["local_batch"] == 1
    assert (run / "backbone" / "model.safetensors").is_file()
