"""Shared pytest setup: markers for slow and GPU tests, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("S3D_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or S3D_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five tiny synthetic T1 volumes, prepared for pre-training (tests/synthetic_scans.py); one per module."""
    from synthetic_scans import prepare_t1_archive

    return prepare_t1_archive(tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("prep"))


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch):
    """A local server speaking the Hub's resolve protocol (tests/hub_server.py), with huggingface_hub pointed
    at it (``HF_ENDPOINT``) and online for the test; stopped afterwards."""
    from hub_server import HubServer

    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # read by s3d at call time
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()
