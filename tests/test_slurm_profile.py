"""The micro workflow through `snakemake --profile slurm`, against a real one-node SLURM cluster on localhost.

CI starts the cluster with ../shared/slurm/up.sh (Debian's slurm-wlm and munge); where SLURM is not installed
or not running, the test skips and says why. Snakemake runs from the repository root, as users type it, under
`timeout -k` (a SLURM executor that loses its status command can hang).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Only for the localhost cluster: it has no accounting database (squeue instead of sacct), answers at once,
# and shares this machine's file system; a real cluster takes these from slurm/config.yaml.
LOCAL_CLUSTER_FLAGS = [
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--latency-wait", "5",
    "--jobs", "2",
]  # fmt: skip


def _cluster_problem() -> str | None:
    for tool in ("sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} not found: SLURM is not installed (CI installs it with ../shared/slurm/up.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out: slurmctld is not answering"
    if "UP" not in ping.stdout:
        found = (ping.stdout + ping.stderr).strip()
        return f"slurmctld is not up ({found}); start it with ../shared/slurm/up.sh"
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
    if not any(s.strip().startswith(("idle", "mix", "alloc")) for s in state.splitlines()):
        return f"no SLURM node is usable (states: {state.split()})"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def test_profile_is_found_from_the_repository_root():
    """`--profile slurm` resolves to ./slurm: its settings show in a dry run (no cluster needed)."""
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert "default-resources" not in profile  # per-rule resources come from the workflow configuration
    default = yaml.safe_load((ROOT / "workflow" / "profiles" / "default" / "config.yaml").read_text())
    # the automatic workflow profile would replace these keys of the SLURM profile whole
    assert not {"executor", "default-resources", "cores", "jobs"} & set(default)


def test_gpu_jobs_get_the_task_geometry_asked_for():
    """The plugin's sbatch line (no cluster needed): a multi-GPU job gets no implicit --ntasks-per-gpu
    (plugins up to 2.7.0 added --ntasks-per-gpu=1, running the command once per GPU); tasks_per_gpu and
    nodes from the configuration's resources are passed as given."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    def sbatch(**resources) -> str:
        job = SimpleNamespace(resources=Resources(resources, mem_mb=1000, runtime=60), threads=64)
        params = dict(run_uuid="u", slurm_logfile="l", comment_str="c", account="", partition="", workdir="")
        return f"{get_submit_command(job, params)} {set_gres_string(job)}"

    plain = sbatch(gpu=8)
    assert "--gpus=8" in plain and "--cpus-per-task=64" in plain
    assert "--ntasks-per-gpu" not in plain and "--nodes" not in plain
    asked = sbatch(gpu=8, tasks_per_gpu=1, nodes=2)
    assert "--ntasks-per-gpu=1" in asked and "--nodes=2" in asked


def test_micro_workflow_through_slurm(cluster, tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    # keep the DAG to a handful of cluster jobs (each costs ~10-15 s of scheduling and polling here), and
    # still fan one stage out over shards
    cfg["data"]["ood"] = {}
    cfg["extract"]["shards"] = 1
    cfg["sample"]["shards"] = 2
    cfg["resources"] = {"default": {"threads": 1, "mem_mb": 1500, "runtime": 10}}
    path = tmp_path / "slurm_micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = ["timeout", "-k", "10", "1500", sys.executable, "-m", "snakemake", "--profile", "slurm"]
    cmd += LOCAL_CLUSTER_FLAGS + ["--configfile", str(path), "--directory", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1560)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "has been submitted with SLURM jobid" in out
    res = tmp_path / "results" / cfg["experiment"]
    with open(res / "metrics" / "demo" / "trunk" / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    n = cfg["sample"]["num_conditionings"]
    assert int(row["n_samples"]) == n * cfg["sample"]["samples_per_image"]
    assert 1 / n <= float(row["mrr"]) <= 1
    assert (res / "samples" / "demo" / "trunk" / "val" / "grid.png").stat().st_size > 0
