"""Every hub error a user can trigger is one exception that names the file (and the key) and says what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hub_server import HubServer  # noqa: E402  (tests/ is on sys.path under pytest)

import s3d
from s3d.hub import CheckpointError, load_pretrained, save_pretrained
from s3d.infer import load_model_dir


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_pretrained(s3d.build_resenc_unet("tiny"), tmp_path / "model")


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: a name wrongly sent to the Hub fails at once instead of retrying."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _edit(config: dict[str, Any], case: str) -> dict[str, Any]:
    if case == "unknown top-level key":
        config["architectur"] = config["architecture"]
    elif case == "unknown architecture key":
        config["architecture"]["depth"] = 3
    elif case == "wrong type":
        config["architecture"]["in_channels"] = "two"
    elif case == "wrong type in a list":
        config["architecture"]["features_per_stage"][1] = 16.5
    elif case == "wrong top-level type":
        config["recipe"] = "pretrain"
    return config


# (case, the key the message must name)
CONFIG_CASES = [
    ("unknown top-level key", "'architectur'"),
    ("unknown architecture key", "'architecture.depth'"),
    ("wrong type", "'architecture.in_channels'"),
    ("wrong type in a list", "'architecture.features_per_stage'"),
    ("wrong top-level type", "'recipe'"),
]


# ---- config.json -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "key"), CONFIG_CASES)
def test_config_error_names_file_and_key(saved: Path, case: str, key: str) -> None:
    path = saved / "config.json"
    path.write_text(json.dumps(_edit(json.loads(path.read_text()), case)))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(saved)
    msg = str(err.value)
    assert str(path) in msg and key in msg, msg
    assert "save_pretrained" in msg or "Remove it" in msg, msg  # says what to do
    # the .safetensors file reads the config next to it: same error
    with pytest.raises(CheckpointError, match=key):
        load_pretrained(saved / "model.safetensors")


def test_config_bad_json_names_the_file(saved: Path) -> None:
    path = saved / "config.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(CheckpointError, match="cannot read JSON config") as err:
        load_pretrained(saved)
    assert str(path) in str(err.value) and "save_pretrained" in str(err.value)


def test_config_of_another_library_and_newer_format(saved: Path) -> None:
    path = saved / "config.json"
    path.write_text('{"trainer": "BaseMAETrainer"}')
    with pytest.raises(CheckpointError, match="not an s3d config") as err:
        load_pretrained(saved)
    assert str(path) in str(err.value) and "'trainer'" in str(err.value)
    config = json.loads(json.dumps({"library": "s3d", "format_version": 2, "architecture": {}}))
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'format_version' is 2.*upgrade s3d"):
        load_pretrained(saved)
    path.write_text(json.dumps({"library": "s3d"}))
    with pytest.raises(CheckpointError, match="missing key 'architecture'"):
        load_pretrained(saved)
    config = {"library": "s3d", "architecture": {"features_per_stage": [8, 16], "strides": [1, 2, 2]}}
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"key 'architecture' is not a valid ResEncUNetConfig \(strides"):
        load_pretrained(saved)


@pytest.mark.parametrize(("case", "key"), CONFIG_CASES[:3])
def test_load_model_dir_config_error_names_file_and_key(saved: Path, case: str, key: str) -> None:
    from s3d.data.nnunet import PreprocessingSpec

    PreprocessingSpec().save(saved / "preprocessing.json")
    assert load_model_dir(saved)[0].config.in_channels == 1  # valid as written
    path = saved / "config.json"
    path.write_text(json.dumps(_edit(json.loads(path.read_text()), case)))
    with pytest.raises(CheckpointError) as err:
        load_model_dir(saved)
    assert str(path) in str(err.value) and key in str(err.value)


REPO = "test-org/bad-config"


def test_config_error_from_a_hub_repo_names_repo_file_and_key(hub: HubServer, saved: Path, tmp_path: Path) -> None:
    config = _edit(json.loads((saved / "config.json").read_text()), "unknown architecture key")
    hub.add_file(REPO, "config.json", json.dumps(config).encode())
    hub.add_file(REPO, "model.safetensors", (saved / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_pretrained(REPO, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert REPO in msg and "config.json" in msg and "'architecture.depth'" in msg
    assert hub.gets("model.safetensors") == 0, "a bad config fails before the weights are downloaded"


# ---- weights files -----------------------------------------------------------------------------------
def test_directory_with_config_but_no_weights_names_the_missing_file(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained(saved)
    assert str(saved / "model.safetensors") in str(err.value) and "save_pretrained" in str(err.value)
    empty = saved.parent / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"expected model.safetensors .* found \[\]") as err:
        load_pretrained(empty)
    assert str(empty) in str(err.value)


def test_truncated_safetensors_names_the_file(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) // 2, len(data) - 1, 4, 0):
        weights.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="not a readable safetensors file.*truncated") as err:
            load_pretrained(saved)
        assert str(weights) in str(err.value), size


def _torch_bytes(obj: object, path: Path) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["text", "random bytes", "empty", "safetensors bytes", "truncated torch zip"])
def test_pth_that_is_not_a_checkpoint_names_the_file(saved: Path, tmp_path: Path, kind: str) -> None:
    full = _torch_bytes(s3d.build_resenc_unet("tiny").state_dict(), tmp_path / "full.pth")
    data = {
        "text": b"not a checkpoint\n",
        "random bytes": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "safetensors bytes": (saved / "model.safetensors").read_bytes(),
        "truncated torch zip": full[: len(full) // 2],
    }[kind]
    path = tmp_path / "weights.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a") and "pickle (arbitrary code" not in msg, msg
    if kind == "safetensors bytes":
        assert "name it .safetensors" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tensors_that_are_not_a_resenc_unet_name_file_and_key(tmp_path: Path, suffix: str) -> None:
    state = {"backbone.conv.weight": torch.zeros(4, 1, 3, 3, 3)}
    path = tmp_path / f"foreign{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot infer the architecture") and "'encoder.stem.convs.0.conv.weight'" in msg


@pytest.mark.usefixtures("offline")
def test_missing_local_paths_are_file_not_found_without_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ["out/model.safetensors", "runs/brain/backbone", "./model", str(tmp_path / "nope"), tmp_path / "x"]:
        with pytest.raises(FileNotFoundError, match="no such file or directory") as err:
            load_pretrained(name)
        assert str(name) in str(err.value)
    # "org/name" is a Hub repo id; when it is not there either, the error says no local path exists
    with pytest.raises(s3d.hub.HubFileError, match="no local file or directory 'runs/brain'"):
        load_pretrained("runs/brain", cache_dir=tmp_path / "cache")
