"""Model zoo over HTTP: a local server speaking the Hub resolve protocol, driven through huggingface_hub."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import pytest
import torch
from hub_server import HubServer  # noqa: E402  (tests/ is on sys.path under pytest)

import s3d
from s3d.hub import ChecksumError, HubFileError, load_pretrained, nnssl_checkpoint, save_pretrained
from s3d.hub import registry as registry_module

REPO = "test-org/tiny-s3d"
COMMIT = "a" * 40


@pytest.fixture()
def model() -> s3d.ResEncUNet:
    return s3d.build_resenc_unet("tiny", num_classes=1).eval()


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def publish(hub: HubServer, model: s3d.ResEncUNet, tmp_path: Path, repo: str = REPO) -> dict[str, bytes]:
    out = save_pretrained(model, tmp_path / "publish")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    for name, data in files.items():
        hub.add_file(repo, name, data, commit=COMMIT)
    return files


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def cached_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts)


def test_download_then_cache_then_offline(
    hub: HubServer, cache: Path, tmp_path: Path, model: s3d.ResEncUNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(hub, model, tmp_path)
    first, report = load_pretrained(REPO, num_classes=1, cache_dir=cache, output_loading_info=True)
    assert same(first, model)
    assert hub.gets("model.safetensors") == 1 and hub.gets("config.json") == 1
    assert report.repo_id == REPO and report.commit == COMMIT and report.format == "s3d"
    second = load_pretrained(REPO, num_classes=1, cache_dir=cache)
    assert hub.gets() == 2, "second load must not GET again"
    assert same(second, model)
    # pinned commit via hf:// resolves from the cache too
    third = load_pretrained(f"hf://{REPO}@{COMMIT}", num_classes=1, cache_dir=cache)
    assert hub.gets() == 2 and same(third, model)
    # offline: no server at all, HF_HUB_OFFLINE on
    hub.stop()
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    offline = load_pretrained(REPO, num_classes=1, cache_dir=cache)
    assert same(offline, model)
    with pytest.raises(HubFileError, match="test-org/other"):
        load_pretrained("test-org/other", cache_dir=cache)


def _entry(
    sha256: str | None, fmt: str = "s3d", filename: str = "model.safetensors"
) -> registry_module.ModelEntry:
    return registry_module.ModelEntry(
        name="test-tiny",
        repo_id=REPO,
        filename=filename,
        revision="main",
        format=fmt,
        architecture="tiny",
        sha256=sha256,
        license="CC-BY-4.0",
        citation="test",
        provenance="test fixture",
    )


def test_sha256_mismatch_fails_and_the_file_is_not_kept(
    hub: HubServer, cache: Path, tmp_path: Path, model: s3d.ResEncUNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = publish(hub, model, tmp_path)
    good = hashlib.sha256(files["model.safetensors"]).hexdigest()
    monkeypatch.setattr(registry_module, "MODELS", (_entry("0" * 64),))
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        load_pretrained("test-tiny", num_classes=1, cache_dir=cache)
    assert REPO in str(err.value) and "model.safetensors" in str(err.value) and good in str(err.value)
    assert "model.safetensors" not in cached_files(cache), "the bad file must be removed from the cache"
    # asking again does not silently use anything: it downloads again and fails again
    with pytest.raises(ChecksumError):
        load_pretrained("test-tiny", num_classes=1, cache_dir=cache)
    assert hub.gets("model.safetensors") == 2
    monkeypatch.setattr(registry_module, "MODELS", (_entry(good),))
    net, report = load_pretrained("test-tiny", num_classes=1, cache_dir=cache, output_loading_info=True)
    assert same(net, model) and report.sha256 == good
    assert any("not pinned" in n for n in report.notes)
    # the pin belongs to the registry's revision: another revision asked for explicitly is not checked
    monkeypatch.setattr(registry_module, "MODELS", (_entry("0" * 64),))
    net, report = load_pretrained(
        "test-tiny", revision=COMMIT, num_classes=1, cache_dir=cache, output_loading_info=True
    )
    assert same(net, model) and report.sha256 is None and report.revision == COMMIT


def test_404_names_repo_and_file(hub: HubServer, cache: Path, tmp_path: Path, model: s3d.ResEncUNet) -> None:
    files = publish(hub, model, tmp_path)
    hub.add_file("test-org/no-weights", "config.json", files["config.json"])
    with pytest.raises(HubFileError) as err:
        load_pretrained("test-org/no-weights", cache_dir=cache)
    assert "test-org/no-weights" in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.raises(HubFileError, match="test-org/missing-repo"):
        load_pretrained("test-org/missing-repo", cache_dir=cache)


def test_truncated_download_is_not_cached(
    hub: HubServer, cache: Path, tmp_path: Path, model: s3d.ResEncUNet
) -> None:
    files = publish(hub, model, tmp_path)
    hub.truncate["model.safetensors"] = len(files["model.safetensors"]) // 2
    with pytest.raises(HubFileError, match="Consistency check failed") as err:
        load_pretrained(REPO, num_classes=1, cache_dir=cache)
    assert f"{REPO}@main/model.safetensors" in str(err.value)
    assert "model.safetensors" not in cached_files(cache)
    del hub.truncate["model.safetensors"]
    net = load_pretrained(REPO, num_classes=1, cache_dir=cache)
    assert same(net, model) and hub.gets("model.safetensors") == 2


def test_nnssl_repo_from_the_hub(
    hub: HubServer, cache: Path, model: s3d.ResEncUNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An nnssl-style repo (checkpoint_final.pth + a foreign config.json), by repo id and via the registry."""
    buf = io.BytesIO()
    torch.save(nnssl_checkpoint(model.state_dict(), model.config), buf)
    hub.add_file(REPO, "checkpoint_final.pth", buf.getvalue(), commit=COMMIT)
    hub.add_file(REPO, "config.json", b'{"trainer": "BaseMAETrainer"}', commit=COMMIT)
    net, report = load_pretrained(
        REPO, in_channels=2, num_classes=3, cache_dir=cache, output_loading_info=True
    )
    assert report.format == "nnssl" and report.stem == "replicated" and report.new_head
    assert hub.gets("checkpoint_final.pth") == 1
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    entry = dataclasses.replace(_entry(sha, "nnssl", "checkpoint_final.pth"), revision=COMMIT)
    monkeypatch.setattr(registry_module, "MODELS", (entry,))
    pinned, report = load_pretrained("test-tiny", num_classes=1, cache_dir=cache, output_loading_info=True)
    assert same(pinned, model) and report.commit == COMMIT and not report.notes
    assert hub.gets("checkpoint_final.pth") == 1  # served from the cache


def test_encoder_only_registry_checkpoint(
    hub: HubServer, cache: Path, model: s3d.ResEncUNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contrastive releases (e.g. VoCo) hold the encoder only: architecture from the entry, fresh decoder."""
    enc = {
        k: v
        for k, v in nnssl_checkpoint(model.state_dict(), model.config)["network_weights"].items()
        if k.startswith("encoder.")
    }
    buf = io.BytesIO()
    torch.save({"network_weights": enc}, buf)
    hub.add_file(REPO, "checkpoint_final.pth", buf.getvalue(), commit=COMMIT)
    monkeypatch.setattr(registry_module, "MODELS", (_entry(None, "nnssl", "checkpoint_final.pth"),))
    net, report = load_pretrained("test-tiny", num_classes=4, cache_dir=cache, output_loading_info=True)
    assert report.random_decoder and any("encoder only" in n for n in report.notes)
    assert any("architecture from the registry entry" in n for n in report.notes)
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(net.state_dict()[key], value), key


def test_timm_create_model_pretrained(
    hub: HubServer, cache: Path, model: s3d.ResEncUNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    timm = pytest.importorskip("timm")
    from s3d.hub.timm_models import register_timm_models

    buf = io.BytesIO()
    torch.save(nnssl_checkpoint(model.state_dict(), model.config), buf)
    hub.add_file(REPO, "checkpoint_final.pth", buf.getvalue(), commit=COMMIT)
    entry = registry_module.ModelEntry(
        name="resenc_l.openmind_mae",
        repo_id=REPO,
        filename="checkpoint_final.pth",
        revision="main",
        format="nnssl",
        architecture="resenc_l",
        aliases=("s3d-b",),
        license="CC-BY-4.0",
        citation="test",
        provenance="test fixture",
    )
    monkeypatch.setattr(registry_module, "MODELS", (entry,))
    assert "resenc_unet_l.s3d_b" in register_timm_models()
    net = timm.create_model(
        "resenc_unet_l.s3d_b", pretrained=True, in_chans=2, num_classes=3, cache_dir=cache
    )
    assert isinstance(net, s3d.ResEncUNet) and net.config.in_channels == 2 and net.config.num_classes == 3
    w1 = model.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert torch.equal(net.state_dict()["encoder.stem.convs.0.conv.weight"], (w1 / 2).repeat(1, 2, 1, 1, 1))
    assert hub.gets("checkpoint_final.pth") == 1
    fresh = timm.create_model("resenc_unet_l", in_chans=1, num_classes=2)
    assert fresh.config.features_per_stage == (32, 64, 128, 256, 320, 320)
