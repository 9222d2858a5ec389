"""A 2-job sweep through Hydra's submitit launcher in local mode: the code path SLURM jobs take."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_submitit_local_sweep_runs_both_jobs(tmp_path):
    command = [sys.executable, "-m", "lightning_masks.app.train", "-m", "hydra/launcher=submitit_local",
               "masks/init=magnitude,stddev", "debug=fdr", "logger=csv",
               f"hydra.sweep.dir={tmp_path}", "hydra.launcher.timeout_min=5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / ".submitit").is_dir()  # the jobs went through submitit
    results = [json.loads((tmp_path / str(job) / "result.json").read_text()) for job in (0, 1)]
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert [r["init"]["name"] for r in results] == ["Magnitude", "StdDev"]
    assert all(r["sparsity"] == pytest.approx(0.9, abs=1e-3) for r in results)
