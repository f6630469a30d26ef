import os
import subprocess
from pathlib import Path

import pytest

SLURM_DIR = Path(os.environ.get("RESIDUAL_SLURM_DIR", "/tmp/residual-slurm"))


@pytest.fixture
def slurm(monkeypatch) -> Path:
    """The local cluster of tools/slurm/start-local.sh, as SLURM_CONF for this test and what it starts."""
    conf = SLURM_DIR / "etc/slurm.conf"
    environ = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        up = conf.exists() and subprocess.run(["sinfo", "-h"], env=environ, capture_output=True).returncode == 0
    except FileNotFoundError:
        up = False
    if not up:
        pytest.skip("no local SLURM cluster: start one with `bash tools/slurm/start-local.sh`")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    return conf
