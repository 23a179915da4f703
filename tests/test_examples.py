"""Every example in examples/ runs (with its CI-sized arguments) so none rots, and the docs build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each example with the arguments that make it small enough for CI. The full-size runs are the
# defaults printed in each file's docstring.
EXAMPLES = {
    "build_model.py": ["--config", "tiny", "--size", "32"],
    "demo_data.py": ["--quick"],
    "finetune_tiny.py": ["{tmp}", "--quick"],
    "load_pretrained.py": [],
    "monai_interop.py": ["--steps", "2", "--size", "32"],
    "pretrain_minimal.py": [],
    "probe_weights.py": ["{tmp}", "--quick"],
    "primus.py": ["--size", "32"],
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name: str, tmp_path) -> None:
    if name == "monai_interop.py":
        pytest.importorskip("monai")
    args = [a.format(tmp=tmp_path / "out") for a in EXAMPLES[name]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "an example should print what it did"


def test_docs_build_strict(tmp_path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "reproducing" / "index.html").is_file()


def test_reproducing_page_covers_every_table() -> None:
    text = (ROOT / "docs" / "reproducing.md").read_text()
    for item in [f"Table {i}" for i in range(1, 9)] + ["Fig. 3"]:
        assert item in text, item
