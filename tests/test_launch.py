"""The real client path: a token-authenticated local Ray head, `ray job submit` of the sample
training through launchers/local.sh, SUCCEEDED, a model package on disk, the head stopped."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow



def test_job_submit_sample_training(tmp_path):
    home = tmp_path / "home"  # its own ~/.ray/auth_token
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="vpdjob")  # short: Ray's socket paths must stay under 107 bytes
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "VPD_RAY_PORT": str(free_port()),
        "VPD_DASHBOARD_PORT": str(free_port()),
        "VPD_RAY_START_ARGS": f"--dashboard-agent-listen-port={free_port()} --temp-dir={temp_dir}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # the real home's caches: DeepSpeed's CPU comm op, built once, would build again (90 s) in a new HOME
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # the launcher's own token from HOME/.ray/auth_token
    overrides = [f"run.storage_path={tmp_path}/runs", "run.name=job", "train.max_steps=4", "train.val_every=4",
                 "train.log_every=2",
                 "train.max_val_batches=1"]
    try:
        proc = subprocess.run(["launchers/local.sh", "configs/sample.yaml", *overrides], env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert (tmp_path / "runs" / "job" / "package" / "model.safetensors").is_file()
    # The head is gone: its GCS port no longer accepts connections.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(env["VPD_RAY_PORT"]))) != 0
