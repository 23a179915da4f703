"""benchmarks/gpu_session.sh, the one-call GPU measurement script, must not rot between GPU sessions.

A device session is short and rare, so the script is dry-run here on the CPU with tiny sizes
(``DEVICE=cpu QUICK=1``): every step must start, parse its arguments and print its table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_session_script_dry_run_on_cpu(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    status = dict(re.findall(r"^(\w+) rc=(\d+)", (out / "status.txt").read_text(), re.M))
    assert status == {"forward": "0", "pretrain_step": "0", "sparse_engine": "0", "predict": "0",
                      "dataloader": "0", "finetune": "0", "demo": "0"}, (out / "status.txt").read_text()
    # each step printed its measurement, not only a header
    pre = [json.loads(line) for line in (out / "pretrain_step.txt").read_text().splitlines() if line.startswith("{")]
    assert [r["variant"] for r in pre[1:]] == ["fp32", "channels_last"]
    assert all(r["s_per_step"] > 0 for r in pre[1:]), pre
    assert "| fp32 |" in (out / "forward.txt").read_text()
    ft = [json.loads(line) for line in (out / "finetune.txt").read_text().splitlines() if line.startswith("{")]
    assert [r["variant"] for r in ft[1:]] == ["loader", "fp32"] and ft[2]["s_per_step"] > 0, ft
    assert (out / "demo" / "report.md").exists()
    assert "torch" in (out / "env.txt").read_text()
