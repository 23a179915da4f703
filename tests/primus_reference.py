"""Write ``tests/data/primus/``: what dynamic-network-architectures' ``Primus`` computes, for tests/test_primus*.py.

DNA 0.4.4's Primus builds only under timm <= 1.0.16 (its 3D rotary embedding fails at construction
from timm 1.0.17 on: "size of tensor a (96) must match ... (144)" under timm 1.0.31), while s3d runs
on current timm. So the reference runs in a pinned side environment that reuses s3d's torch and DNA
and only swaps timm:

    pip install --target /work/ref-timm1016 --no-deps timm==1.0.16
    PYTHONPATH=/work/ref-timm1016 /work/venv/bin/python tests/primus_reference.py

It does not import s3d. It writes:

- ``primus_m_160_keys.json``: key -> shape of DNA's ``PrimusM(1, C, (8, 8, 8), (160, 160, 160))`` for
  C = 1 and C = 2, in ``state_dict()`` order (the 160^3 table the key/shape test and the export test
  compare against);
- ``nnssl_evamae_small_keys.json``: key -> shape of nnssl's Primus MAE layout (``down_projection``,
  ``eva``, ``up_projection``, a decoder EVA ``decoder``, a learnt ``mask_token``) built from DNA's
  parts for the small configuration below, so that the nnssl-layout test checkpoints can be checked
  against the structure of the real ones;
- ``small.safetensors``: a small Primus (non-cubic patch and input, 2 blocks, RoPE, absolute position
  embedding, layer scale, attention-inner norm) with seeded non-trivial float32 weights (the float64
  run uses exactly these values), a seeded float32 input, the reference outputs of the float64 and of
  the float32 network (stored as float64), and the rotary table the reference used (``rope``: float32
  values, as DNA computes it, stored as float64);
- ``small.json``: the configuration of that network and the versions that wrote the files.

Written with timm 1.0.16, dynamic-network-architectures 0.4.4 and torch 2.14.1 (CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

OUT = Path(__file__).parent / "data" / "primus"

#: The small configuration (DNA ``Primus`` keyword names).
SMALL = {
    "input_channels": 1,
    "embed_dim": 48,
    "patch_embed_size": [4, 4, 2],
    "num_classes": 3,
    "eva_depth": 2,
    "eva_numheads": 2,
    "input_shape": [8, 12, 8],
    "init_values": 0.1,
    "scale_attn_inner": True,
}
BATCH = 2


def _key_shapes(state: dict[str, torch.Tensor]) -> list[list]:
    return [[k, list(v.shape)] for k, v in state.items()]


def _dump(obj: dict) -> str:
    """JSON with one ``[key, shape]`` pair per line (readable diffs)."""
    lines = ["{"]
    items = list(obj.items())
    for i, (name, value) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if isinstance(value, list):
            rows = ",\n".join("  " + json.dumps(row) for row in value)
            lines.append(f" {json.dumps(name)}: [\n{rows}\n ]{end}")
        else:
            lines.append(f" {json.dumps(name)}: {json.dumps(value)}{end}")
    return "\n".join(lines) + "\n}\n"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights of the size a trained network has: no 1/0 norms, no 0.1 layer scales (which hide mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and (name.endswith("weight") or "gamma" in name):  # norm scales, layer scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                if "gamma" in name:
                    p.mul_(0.5)
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def main() -> None:
    import timm
    from dynamic_network_architectures.architectures.primus import Primus, PrimusM
    from dynamic_network_architectures.building_blocks.eva import Eva
    from dynamic_network_architectures.building_blocks.patch_encode_decode import PatchDecode, PatchEmbed

    if timm.__version__ != "1.0.16":
        sys.exit(f"run this with timm 1.0.16 (found {timm.__version__}); see the module docstring")
    import dynamic_network_architectures as dna

    OUT.mkdir(parents=True, exist_ok=True)
    versions = {
        "timm": timm.__version__,
        "dynamic_network_architectures": getattr(dna, "__version__", "0.4.4"),
        "torch": torch.__version__,
    }

    # (a) the 160^3 key/shape tables of DNA's PrimusM
    tables = {}
    for classes in (1, 2):
        net = PrimusM(1, classes, (8, 8, 8), (160, 160, 160))
        tables[f"num_classes={classes}"] = _key_shapes(net.state_dict())
        del net
    (OUT / "primus_m_160_keys.json").write_text(_dump({"versions": versions, **tables}))

    # (b) nnssl's Primus MAE layout at the small configuration, built from DNA's parts as nnssl's EvaMAE
    # composes them (attribute names and order from nnssl's architectures/evaMAE_module.py)
    c = SMALL
    grid = [s // p for s, p in zip(c["input_shape"], c["patch_embed_size"], strict=True)]

    def eva(depth: int) -> torch.nn.Module:
        return Eva(embed_dim=c["embed_dim"], depth=depth, num_heads=c["eva_numheads"], ref_feat_shape=tuple(grid),
                   init_values=c["init_values"], scale_attn_inner=c["scale_attn_inner"])

    mae = torch.nn.Module()
    mae.down_projection = PatchEmbed(c["patch_embed_size"], c["input_channels"], c["embed_dim"])
    mae.eva = eva(c["eva_depth"])
    mae.up_projection = PatchDecode(c["patch_embed_size"], c["embed_dim"], 1)
    mae.decoder = eva(1)
    mae.mask_token = torch.nn.Parameter(torch.zeros(1, 1, c["embed_dim"]))
    (OUT / "nnssl_evamae_small_keys.json").write_text(
        _dump({"versions": versions, "config": {**c, "num_classes": 1, "decoder_eva_depth": 1},
               "keys": _key_shapes(mae.state_dict())})
    )

    # (c) outputs of the small network in float64 and float32
    torch.manual_seed(0)
    net = Primus(c["input_channels"], c["embed_dim"], tuple(c["patch_embed_size"]), c["num_classes"],
                 c["eva_depth"], c["eva_numheads"], tuple(c["input_shape"]), init_values=c["init_values"],
                 scale_attn_inner=c["scale_attn_inner"]).eval()
    _randomize(net, seed=1)
    # round every weight to float32 once, so the float64 network holds exactly the float32 weights
    state = {k: v.float() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    x = torch.randn(BATCH, c["input_channels"], *c["input_shape"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y32 = net(x)
        net64 = net.double()
        y64 = net64(x.double())
    tensors = {f"weight.{k}": v for k, v in state.items()}  # float32, as used by both runs
    tensors.update({
        "input": x,
        "output_float64": y64,
        "output_float32": y32.double(),
        "rope": net.eva.rope.get_embed().double(),
    })
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "small.safetensors"),
              metadata={k: str(v) for k, v in versions.items()})
    (OUT / "small.json").write_text(json.dumps({"versions": versions, "config": c, "batch": BATCH}, indent=1) + "\n")
    print(f"wrote {sorted(p.name for p in OUT.iterdir())} with {versions}")


if __name__ == "__main__":
    main()
