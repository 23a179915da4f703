"""The pre-training method contract (issue 23): what a method provides, what the loop asks of it, nothing else.

References: the mask-block arithmetic by hand (a patch is a whole number of blocks, at least 2); a toy
method, registered for the test, trained by the unchanged loop; the engine choices through ``state_dict``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import pytest
import torch
from test_pretrain import TINY
from torch import nn

import s3d.pretrain as pretrain_mod
from s3d.nn import build_resenc_unet
from s3d.pretrain import (
    METHODS,
    JobResult,
    Method,
    PatchProblem,
    PatchProblemError,
    PretrainConfig,
    PretrainMethod,
    PretrainRecipe,
    Trainer,
    build_method,
    read_metrics,
)
from s3d.pretrain import run as pretrain
from s3d.sparse import SparseMAEWrapper

KWARGS = {"mae": {"block_size": 16}, "mg": {}, "vf": {}, "voco": {"crop_size": 32, "num_targets": 2}}


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_resenc_unet("tiny", in_channels=1, num_classes=1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_provides_the_contract(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3D_ENGINE_AUTOTUNE", "0")  # MAE's engine="auto" from the fixed table: no timing here
    method = build_method(name, _tiny(), **KWARGS[name])
    assert isinstance(method, PretrainMethod)
    x = torch.randn(1, 1, 64, 64, 32, generator=torch.Generator().manual_seed(1))
    assert method.prepare_batch(x) is x  # the built-in methods take the patches as they are
    out = method(method.prepare_batch(x))
    assert len(method.engine_choices) == (1 if name == "mae" else 0)  # MAE chose its encoder engine
    assert out.loss.dim() == 0 and (out.loss_weight is None or out.loss_weight.dim() == 0)
    assert out.reconstruction is None or out.reconstruction.shape[2:] == x.shape[2:]
    assert method.export_backbone().keys() == method.backbone.state_dict().keys()


def test_a_module_without_the_contract_is_refused_at_build_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "linear", Method("linear", lambda backbone: nn.Linear(1, 1), "s3d-b", "not one"))
    with pytest.raises(TypeError, match="method 'linear': Linear is not a pre-training method; it lacks backbone"):
        build_method("linear", _tiny())


@pytest.mark.parametrize(("patch", "block", "fix"), [((32, 32, 32), 32, (32, 32, 64)), ((40, 32, 32), 16, (48, 32, 32)),
                                                     ((16, 16, 16), 16, (16, 16, 32)), ((64, 32, 32), 32, None)])
def test_mae_patch_problem_names_library_parameters(patch, block, fix) -> None:
    problem = SparseMAEWrapper(build_resenc_unet("tiny", num_classes=1), block_size=block).patch_problem(patch)
    if fix is None:
        assert problem is None  # 2 x 1 x 1 blocks: one can be visible and one masked
        return
    assert problem.patch_size == patch and problem.fix_patch_size == fix
    assert all(f % block == 0 for f in fix) and math.prod(f // block for f in fix) >= 2  # the fix works
    assert problem.fix_method_kwargs == {"block_size": block // 2}
    msg = problem.message()
    assert msg.startswith(f"patch_size {patch}: with mask block_size {block}") and "--" not in msg
    assert f"patch_size={fix}" in msg and f"method_kwargs={{'block_size': {block // 2}}}" in msg


def test_voco_patch_problem() -> None:
    voco = build_method("voco", _tiny(), crop_size=32, num_targets=2)
    assert voco.patch_problem((64, 96, 32)) is None
    assert voco.patch_problem((48, 64, 20)).fix_patch_size == (64, 64, 32)


def test_the_loop_refuses_a_patch_before_the_first_step_in_library_terms(prepared, tmp_path: Path) -> None:  # noqa: F811
    kw = {**TINY, "method_kwargs": {"block_size": 32}}
    cfg = PretrainConfig(data=str(prepared), out=str(tmp_path / "run"), **kw)
    with pytest.raises(PatchProblemError) as err:
        pretrain(cfg)
    assert err.value.problem == PatchProblem((32, 32, 32), err.value.problem.reason, (32, 32, 64), {"block_size": 16})
    assert str(err.value).startswith("patch_size (32, 32, 32): with mask block_size 32")
    assert not (tmp_path / "run" / "checkpoint_latest.pt").exists()


class _ToyOutput(NamedTuple):
    loss: torch.Tensor
    loss_weight: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    target: torch.Tensor | None = None


class _Toy(nn.Module):
    """A method the loop has never seen: reconstruct the negated input (its batch preparation negates)."""

    engine_choices = MappingProxyType({})

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.prepared: list[torch.Tensor] = []
        self.seen: list[torch.Tensor] = []
        self.losses: list[float] = []

    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        self.prepared.append(x)
        return -x

    def patch_problem(self, patch_size) -> PatchProblem | None:
        return None

    def forward(self, x: torch.Tensor) -> _ToyOutput:
        self.seen.append(x)
        loss = (self.backbone(x).float() - x).square().mean()
        self.losses.append(float(loss.detach()))
        return _ToyOutput(loss)

    def export_backbone(self) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((k, v.detach().clone()) for k, v in self.backbone.state_dict().items())


def test_a_new_method_plugs_in_without_touching_the_loop(prepared, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    made: list[_Toy] = []
    monkeypatch.setitem(METHODS, "toy", Method("toy", lambda b: made.append(_Toy(b)) or made[-1], "s3d-b", "toy"))
    recipe = PretrainRecipe(name="toy", method="toy", architecture="tiny", patch_size=(32, 32, 32), batch_size=2,
                            steps=2)
    cfg = PretrainConfig(data=str(prepared), out=str(tmp_path / "run"), recipe=recipe, workers=0, progress=False,
                         val_fraction=0.2, val_every=2, snapshot_every=0, checkpoint_every=2)
    res = pretrain(cfg)
    (toy,) = made
    assert isinstance(res, JobResult) and res.finished and res.step == 2
    # every batch the method saw went through its own preparation: 2 training batches, 1 validation batch
    assert len(toy.seen) == len(toy.prepared) == 3 and all(torch.equal(s, -p) for s, p in zip(toy.seen, toy.prepared))
    assert [read_metrics(tmp_path / "run")[s] for s in (1, 2)] == pytest.approx(toy.losses[:2], rel=1e-6)
    assert read_metrics(tmp_path / "run", "val_loss")[2] == pytest.approx(toy.losses[2], rel=1e-6)
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, toy.backbone.state_dict()[k]), k


def test_engine_choices_travel_with_the_state_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3D_ENGINE_AUTOTUNE", "0")  # the fixed table: no timing in this test
    mae = SparseMAEWrapper(_tiny(), block_size=16, mask_ratio=0.5)
    with torch.no_grad():
        mae(torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2)))
    (choice,) = mae.engine_choices.values()
    state = mae.state_dict()
    assert state["_extra_state"] == {"engine_choices": [choice.to_dict()]}
    fresh = SparseMAEWrapper(_tiny(), block_size=16, mask_ratio=0.5)
    fresh.load_state_dict(state)
    (restored,) = fresh.engine_choices.values()
    assert restored.to_dict() == {**choice.to_dict(), "source": "checkpoint"} and restored.key == choice.key
    # a state dict from before the choices were part of it still loads (strictly), with no choice
    older = SparseMAEWrapper(_tiny(), block_size=16, mask_ratio=0.5)
    older.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"})
    assert older.engine_choices == {}


def test_old_names_still_work_with_a_deprecation_warning(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="PretrainRun is now s3d.pretrain.Trainer"):
        assert pretrain_mod.PretrainRun is Trainer
    res = JobResult(nn.Identity(), tmp_path, 3, True, {"backbone": tmp_path / "b"}, {"loss": 0.5})
    with pytest.warns(DeprecationWarning, match="JobResult"):
        assert res["backbone"] == str(tmp_path / "b") and res["loss"] == 0.5 and res["step"] == 3
