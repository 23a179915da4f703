"""The two job entry points (issue 23): ``s3d.pretrain.run`` and ``s3d.finetune.run`` take the same argument names
(``data``, ``out``) and return the same :class:`~s3d.runtime.result.JobResult`; fine-tuning's old keywords
(``dataset=``, ``out_dir=``) and its old return value (the model) still work, with a ``DeprecationWarning``.

References: the run's own ``metrics.jsonl`` (what the job logged), and the same seeded run under the new and the
old keywords (the model weights must be bitwise the same).
"""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
from test_nnunet_data import make_sphere_dataset

import s3d
from s3d.runtime.result import JobResult

TINY = dict(config="tiny", batch_size=2, patch_size=(32, 32, 32), schedule="best", steps=3, warmup_steps=1,
            val_every=1000, checkpoint_every=1000, final_validation=False, progress=False, seed=3)


def test_both_entry_points_name_their_folders_data_and_out() -> None:
    for run in (s3d.pretrain.run, s3d.finetune.run):
        assert inspect.signature(run).return_annotation in (JobResult, "JobResult")
    assert s3d.finetune.run.__module__ == "s3d.finetune.job" and s3d.pretrain.run.__module__ == "s3d.pretrain.job"


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_finetune_run_new_and_old_keywords(tmp_path) -> None:
    ds = tmp_path / "ds"
    make_sphere_dataset(ds, n=4, size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the new names warn about nothing
        new = s3d.finetune.run(data=ds, out=tmp_path / "new", **TINY)
    assert isinstance(new, JobResult) and new.finished and new.step == 3 and new.run_dir == tmp_path / "new"
    assert new.paths["model"] == tmp_path / "new" / "model" and (new.paths["model"] / "preprocessing.json").is_file()
    assert new.paths["metrics"] == tmp_path / "new" / "metrics.jsonl" and new.paths["checkpoint"].is_file()
    logged = _records(tmp_path / "new")
    assert new.metrics["loss"] == [r["loss"] for r in logged if "loss" in r][-1]
    assert new.metrics["val_dice"] == [r["val_dice"] for r in logged if "val_dice" in r][-1]

    with pytest.warns(DeprecationWarning) as warned:
        old = s3d.finetune.run(dataset=str(ds), out_dir=str(tmp_path / "old"), **TINY)
    said = sorted(str(w.message) for w in warned if issubclass(w.category, DeprecationWarning))
    assert said == ["s3d.finetune.run(dataset=...) is deprecated: use data=... (as s3d.pretrain.run)",
                    "s3d.finetune.run(out_dir=...) is deprecated: use out=... (as s3d.pretrain.run)"], said
    assert isinstance(old, JobResult) and old.paths["model"] == tmp_path / "old" / "model"
    for k, v in new.model.state_dict().items():  # the same seeded job, whatever the keywords
        assert torch.equal(v, old.model.state_dict()[k]), k

    # the model the old run() returned: its attributes and calls still work, with a warning
    with pytest.warns(DeprecationWarning, match=r"result\.state_dict: .* use result\.model\.state_dict"):
        sd = old.state_dict()
    assert sd.keys() == old.model.state_dict().keys()
    x = torch.randn(1, 2, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    old.model.eval()
    with torch.no_grad():
        want = old.model(x)
        with pytest.warns(DeprecationWarning, match=r"result\(x\)"):
            got = old(x)
    first = (lambda y: y[0] if isinstance(y, (list, tuple)) else y)  # noqa: E731 - deep supervision: full res
    assert torch.equal(first(got), first(want))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = old.nonsense


def test_finetune_run_refuses_a_folder_given_twice_or_missing(tmp_path) -> None:
    with pytest.raises(TypeError, match="dataset folder given twice"):
        s3d.finetune.run(tmp_path / "ds", data=tmp_path / "ds")
    with pytest.raises(TypeError, match="data= or the deprecated dataset=, not both"), \
            pytest.warns(DeprecationWarning):
        s3d.finetune.run(data=tmp_path / "ds", dataset=tmp_path / "ds", out=tmp_path / "o")
    with pytest.raises(TypeError, match="missing out"):
        s3d.finetune.run(data=tmp_path / "ds")
