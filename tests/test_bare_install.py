"""s3d on a bare PyTorch image: nibabel, blosc2 and tqdm unimportable (docs/install.md).

A subprocess installs a ``sys.meta_path`` finder that makes those three packages fail to import, as on
an image that lacks them, *before* importing s3d. In it: ``import s3d``, the models, a seeded sparse-MAE
forward + backward step, the zoo and the shipped weights work and import none of the three; reading a
NIfTI file and ``s3d predict`` say in one line which package is missing and how to install it. Then the
finder is removed and the same seeded step runs again in the same process with the packages importable:
the loss is bitwise the same (the same kernels on the same input; the packages change nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BLOCKED = ("nibabel", "blosc2", "tqdm")

CHILD = textwrap.dedent('''
    import importlib.abc, importlib.machinery, json, math, sys

    BLOCKED = set(sys.argv[1].split(","))

    class _Absent(importlib.abc.Loader):
        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):
            raise ModuleNotFoundError(f"No module named {module.__name__!r}", name=module.__name__)

    class Block(importlib.abc.MetaPathFinder):
        """Finds the blocked packages with a loader that raises ImportError, as if not installed
        (find_spec still answers, so a probe such as importlib.util.find_spec does not crash)."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, _Absent())
            return None

    block = Block()
    sys.meta_path.insert(0, block)
    for name in BLOCKED:  # really unimportable
        try:
            __import__(name)
            raise SystemExit(f"{name} imported despite the block")
        except ImportError:
            pass

    import torch

    import s3d
    from s3d.cli import main

    def step():
        torch.manual_seed(0)
        net = s3d.build_resenc_unet("tiny", in_channels=1, num_classes=1)
        mae = s3d.SparseMAEWrapper(net, block_size=8, mask_ratio=0.75, engine="blocks")
        x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
        out = mae(x, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        grad = sum(float(p.grad.double().square().sum()) for p in mae.parameters() if p.grad is not None)
        return float(out.loss), grad

    result = {}
    result["loss"], result["grad"] = step()
    result["zoo"] = [e.name for e in s3d.list_models()]
    model = s3d.load_pretrained("s3d-demo")
    result["demo_params"] = sum(p.numel() for p in model.parameters())
    try:
        from s3d.data.io import read_nifti
        read_nifti(sys.argv[2])
        result["read_error"] = None
    except ImportError as e:
        result["read_error"] = str(e)
    result["predict_rc"] = main(["predict", "-i", sys.argv[3], "-o", sys.argv[4], "-m", sys.argv[5],
                                 "--device", "cpu"])
    result["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)

    sys.meta_path.remove(block)  # the same process, the packages importable again
    for name in BLOCKED:
        __import__(name)
    result["loss_with_packages"], result["grad_with_packages"] = step()
    print(json.dumps(result))
''')


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    import nibabel as nib
    import torch

    from s3d.data.nnunet import PreprocessingSpec
    from s3d.hub import save_pretrained

    root = tmp_path_factory.mktemp("bare")
    (root / "in").mkdir()
    image = root / "in" / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32), np.eye(4)),
             str(image))
    torch.manual_seed(0)
    import s3d

    save_pretrained(s3d.build_resenc_unet("tiny", in_channels=1, num_classes=2), root / "model")
    PreprocessingSpec(channel_names=("t1",), labels={"background": 0, "a": 1}, patch_size=(32, 32, 32)).save(
        root / "model" / "preprocessing.json")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(BLOCKED), str(image), str(root / "in"),
                           str(root / "out"), str(root / "model")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr, root


def test_import_models_sparse_step_zoo_and_weights_without_nibabel_blosc2_tqdm(bare) -> None:
    result, _stderr, _root = bare
    assert result["imported"] == []  # none of the three was needed
    assert np.isfinite(result["loss"]) and result["loss"] > 0 and np.isfinite(result["grad"]) and result["grad"] > 0
    # the same seeded step with the packages importable, in the same process: the same kernels on the same
    # input, so bitwise the same loss and gradients
    assert result["loss"] == result["loss_with_packages"] and result["grad"] == result["grad_with_packages"]
    assert "s3d-demo" in result["zoo"] and result["demo_params"] > 0


def test_missing_package_is_one_line_naming_it(bare) -> None:
    result, stderr, root = bare
    assert result["read_error"] == "reading NIfTI needs nibabel: pip install nibabel"
    assert result["predict_rc"] == 1
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == ["s3d predict: error: reading NIfTI needs nibabel: pip install nibabel"], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (root / "out").exists()  # refused before anything was written
